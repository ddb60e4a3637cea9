// What the SDK scripts share: named scenarios that all run, even after one
// failed, so one broken feature never hides another.

let passed = 0;
const failed = [];

/** Runs one scenario; a thrown error fails it and is printed, the next runs. */
export async function scenario(name, body) {
  try {
    await body();
    passed += 1;
    console.log(`ok: ${name}`);
  } catch (e) {
    failed.push(name);
    console.log(`FAILED: ${name}\n${e?.stack ?? e}\n`);
  }
}

/** Awaits `promise`, which must reject with an instance of `type`; returns the error. */
export async function rejects(promise, type) {
  let result;
  try {
    result = await promise;
  } catch (e) {
    if (e instanceof type) return e;
    throw new Error(`expected ${type.name}, got ${e?.constructor?.name}: ${e}`, { cause: e });
  }
  throw new Error(`expected ${type.name}, but the call succeeded: ${JSON.stringify(result)}`);
}

/** Prints the tally; exits non-zero when a scenario failed (or none ran). */
export function summary(sdk) {
  console.log(`${sdk}: ${passed} passed, ${failed.length} failed`);
  if (failed.length > 0 || passed === 0) {
    for (const name of failed) console.log(`  failed: ${name}`);
    process.exitCode = 1;
  }
}
