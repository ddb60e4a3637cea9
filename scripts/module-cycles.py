#!/usr/bin/env python3
"""Import cycles between detour's modules: a CI check that fails on a new one.

Reads every `crate::…` and `super::…` path in the gateway's src/ and in each
workspace crate's crates/<name>/src (test code excluded: files named tests.rs
and `#[cfg(test)] mod … { … }` blocks), folds each path to a node (a top-level
module, or `protocol::<sub>` for the protocol crate as the gateway sees it),
and finds the strongly connected components of the resulting graph (Tarjan).
A crate's modules are nodes of their own, named `<crate>::<module>` (e.g.
`detour_mock::server`); the gateway's are bare. Crates depend on each other
one way by construction (cargo refuses a cycle between crates), so only
cycles inside a crate can exist, and each crate is checked for its own.

The layering is written down in ARCHITECTURE.md: lower layers never import
higher ones, so the graph must have no cycle. Until every known back-edge is
cut, `scripts/module-cycles.allow` lists the edges that are known to close a
cycle today; an edge that closes a cycle and is not listed fails the check, and
a listed edge that no longer exists, or no longer closes a cycle, is reported
so the list only shrinks.

Usage: scripts/module-cycles.py [--graph]   (exit 1 on a new cycle)
"""

import os
import re
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SRC = os.path.join(ROOT, "src")
CRATES = os.path.join(ROOT, "crates")
ALLOW = os.path.join(ROOT, "scripts", "module-cycles.allow")

# Modules folded one level deeper: their submodules are layers of their own.
DEEP = {"protocol"}
# Roots that may import anything (the binary's entry points, a crate's root).
ROOTS = {"main", "lib"}
# In a crate root: `pub use detour_protocol as protocol;` makes `protocol` a
# module name of this crate.
REEXPORT = re.compile(r"^pub use [A-Za-z_][A-Za-z0-9_]* as ([A-Za-z_][A-Za-z0-9_]*);", re.M)

PATH = re.compile(r"\b(crate|super)((?:::[A-Za-z_][A-Za-z0-9_]*)+)")
GROUP = re.compile(r"\b(crate|super)((?:::[A-Za-z_][A-Za-z0-9_]*)*)::\{")


def module_of(path, src):
    rel = os.path.relpath(path, src)[: -len(".rs")].split(os.sep)
    if rel[-1] == "mod":
        rel = rel[:-1]
    return rel


def node(parts):
    if not parts:
        return None
    if parts[0] in DEEP and len(parts) > 1:
        return "::".join(parts[:2])
    return parts[0]


def sanitize(text):
    """Drops comments and the contents of string and char literals, which
    may hold braces or paths that are not code."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        nxt = text[i + 1] if i + 1 < n else ""
        if c == "/" and nxt == "/":
            while i < n and text[i] != "\n":
                i += 1
        elif c == "/" and nxt == "*":
            depth, i = 1, i + 2
            while i < n and depth:
                if text.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif text.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
        elif c == "r" and re.match(r'r#*"', text[i:]) and not (i and (text[i - 1].isalnum() or text[i - 1] == "_")):
            hashes = re.match(r'r(#*)"', text[i:]).group(1)
            end = text.find('"' + hashes, i + len(hashes) + 2)
            i = n if end < 0 else end + 1 + len(hashes)
            out.append('""')
        elif c == '"':
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
            i += 1
            out.append('""')
        elif c == "'" and re.match(r"'(\\.[^']*|[^'\\])'", text[i:]):
            i += len(re.match(r"'(\\.[^']*|[^'\\])'", text[i:]).group(0))
            out.append("' '")
        else:
            out.append(c)
            i += 1
    return "".join(out)


def strip_tests(text):
    """Drops `#[cfg(test)]` items (a module block or a single item)."""
    out, lines, i = [], text.split("\n"), 0
    while i < len(lines):
        if lines[i].strip() == "#[cfg(test)]":
            # Skip the item that follows: to the end of its braces, or to `;`.
            depth, started = 0, False
            i += 1
            while i < len(lines):
                line = lines[i]
                depth += line.count("{") - line.count("}")
                started = started or "{" in line
                i += 1
                if (started and depth <= 0) or (not started and line.rstrip().endswith(";")):
                    break
            continue
        out.append(lines[i])
        i += 1
    return "\n".join(out)


def group_items(text, start):
    """The first path segment of each item in a `{…}` use group at `start`."""
    depth, i, buf, items = 1, start, "", []
    while i < len(text) and depth:
        c = text[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
        if depth == 1 and c == ",":
            items.append(buf)
            buf = ""
        elif depth >= 1 and not (depth == 1 and c == "}"):
            buf += c
        i += 1
    items.append(buf)
    return [re.split(r"[:\s{]", s.strip())[0] for s in items if s.strip()]


def references(path, src):
    me = module_of(path, src)
    text = strip_tests(sanitize(open(path, encoding="utf-8").read()))
    targets = set()

    def resolve(kind, segs):
        if kind == "crate":
            return segs
        base = me[:-1] if me else []
        return base + segs

    for m in PATH.finditer(text):
        segs = [s for s in m.group(2).split("::") if s]
        targets.add(node(resolve(m.group(1), segs)))
    for m in GROUP.finditer(text):
        prefix = [s for s in m.group(2).split("::") if s]
        for item in group_items(text, m.end()):
            if item and item != "self":
                targets.add(node(resolve(m.group(1), prefix + [item])))
            elif item == "self":
                targets.add(node(resolve(m.group(1), prefix)))
    return node(me), targets


def modules(src):
    """The crate's top-level module names: its files and directories under
    src, and the crates its root re-exports under a module name. A path into
    anything else (`super::Flavor` for an item of the crate root) names the
    root, which may be imported from anywhere."""
    names = {f[: -len(".rs")] if f.endswith(".rs") else f for f in os.listdir(src)}
    for root in ("lib.rs", "main.rs"):
        if os.path.exists(os.path.join(src, root)):
            names |= set(REEXPORT.findall(open(os.path.join(src, root), encoding="utf-8").read()))
    return names - ROOTS


def crate_graph(src, prefix=""):
    known, edges = modules(src), {}
    for dirpath, _, files in os.walk(src):
        for f in files:
            if not f.endswith(".rs") or f == "tests.rs":
                continue
            me, targets = references(os.path.join(dirpath, f), src)
            if me in ROOTS or me is None:
                continue
            for t in targets:
                if t and t != me and t.split("::")[0] in known:
                    edges.setdefault(prefix + me, set()).add(prefix + t)
            edges.setdefault(prefix + me, set())
    return edges


def graph():
    """The gateway's modules, and each workspace crate's, in one graph (no
    edge joins two crates' nodes, so each crate's cycles are its own)."""
    edges = crate_graph(SRC)
    if os.path.isdir(CRATES):
        for name in sorted(os.listdir(CRATES)):
            src = os.path.join(CRATES, name, "src")
            if os.path.isdir(src):
                edges.update(crate_graph(src, name.replace("-", "_") + "::"))
    return edges


def sccs(edges):
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


# The gateway's layers, lowest first (ARCHITECTURE.md, "Layers"). A module may
# import its own layer and those below, never one above. A new module must be
# given a layer here. Nodes of other crates (`detour_mock::…`) are not layered:
# a crate cannot import the gateway at all.
LAYERS = [
    ("leaves", {"after_write", "boxed", "config", "clock", "metrics", "mock", "when_woken", "workers"}),
    ("shared state", {"shared"}),
    ("policy", {"access", "auth", "health", "budget", "limits", "routing", "cache", "incidents"}),
    ("data plane", {"dns", "upstream", "providers", "state", "health_sync", "request", "telemetry", "traces",
                    "relay", "proxy", "ingress", "error", "listener", "server"}),
    ("control plane", {"reload", "rollout", "status_pages", "admin", "public_status"}),
    ("entry points", {"demo", "drill"}),
]


def layer_of(node):
    if node.startswith("protocol"):
        return 0
    for i, (_, members) in enumerate(LAYERS):
        if node in members:
            return i
    return None


def upward(edges):
    """Imports that point from a lower layer to a higher one, and modules
    that have no layer."""
    problems = []
    for src in sorted(edges):
        if "::" in src and not src.startswith("protocol"):
            continue  # another crate's own module graph
        a = layer_of(src)
        if a is None:
            problems.append(f"  {src} has no layer: add it to LAYERS in scripts/module-cycles.py")
            continue
        for dst in sorted(edges[src]):
            b = layer_of(dst)
            if b is not None and b > a:
                problems.append(f"  {src} ({LAYERS[a][0]}) -> {dst} ({LAYERS[b][0]})")
    return problems


def main():
    edges = graph()
    if "--graph" in sys.argv:
        for src in sorted(edges):
            print(f"{src} -> {', '.join(sorted(edges[src]))}")
        return 0
    allowed = set()
    if os.path.exists(ALLOW):
        for line in open(ALLOW, encoding="utf-8"):
            line = line.split("#")[0].strip()
            if line:
                a, b = [s.strip() for s in line.split("->")]
                allowed.add((a, b))
    # Edges inside a strongly connected component are the ones that close cycles.
    cyclic = set()
    for comp in sccs(edges):
        members = set(comp)
        for a in comp:
            for b in edges[a]:
                if b in members:
                    cyclic.add((a, b))
    new = sorted(cyclic - allowed)
    gone = sorted(e for e in allowed if e[1] not in edges.get(e[0], set()))
    for a, b in gone:
        print(f"module-cycles: allowed edge {a} -> {b} no longer exists: remove it from {os.path.relpath(ALLOW, ROOT)}")
    # Still there but no longer part of a cycle (another edge was cut):
    # downward now, so it needs no allowance.
    acyclic = sorted(e for e in allowed - cyclic if e not in gone)
    for a, b in acyclic:
        print(f"module-cycles: allowed edge {a} -> {b} no longer closes a cycle: remove it from {os.path.relpath(ALLOW, ROOT)}")
    if new:
        print("module-cycles: these imports close a cycle between modules (lower layers must not import higher ones; see ARCHITECTURE.md):")
        for a, b in new:
            print(f"  {a} -> {b}")
        return 1
    problems = upward(edges)
    if problems:
        print("module-cycles: these imports point up the layers (lower layers must not import higher ones; see ARCHITECTURE.md):")
        print("\n".join(problems))
        return 1
    print(f"module-cycles: ok ({len(edges)} modules, {len(cyclic)} known cyclic edges allowed, no import up the layers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
