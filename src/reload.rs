//! Changing the config of a running gateway, safely.
//!
//! - **Triggers**: the config file changing on disk (watched with `notify`),
//!   `SIGHUP`, and `POST /admin/reload`. Each one re-reads and validates the
//!   file; an invalid file is refused with the same file/line/key diagnostics
//!   as `detour check`, the running config stays, and the refusal shows in the
//!   log, `GET /admin/reload` and a metric.
//! - **Rollout**: a valid config with a `[rollout]` section bakes on a canary
//!   share first ([`crate::rollout`]); a judge task promotes or rolls it back.
//!   Without one, it is swapped in atomically: requests in flight finish on the
//!   config they started with, and no connection is dropped.
//! - **Last-known-good**: every config that has served a successful request is
//!   written to the state directory (as text, `${ENV}` references unexpanded,
//!   so no secret from the environment lands on disk; mode 0600, as a literal
//!   key may be in it); `serve --fallback-last-known-good` starts
//!   from it when the config file is broken.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::Serialize;

use crate::config::{self, ConfigError};
use crate::rollout::{verdict, Rollout, Verdict};
use crate::state::Gateway;

/// What the last reload did, for the admin API.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadStatus {
    pub at_unix_ms: u64,
    pub trigger: Trigger,
    pub outcome: Outcome,
    pub errors: Vec<String>,
}

/// What asked for a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// The config file changed on disk.
    FileChange,
    /// The process got `SIGHUP`.
    Sighup,
    /// `POST /admin/reload`.
    Admin,
    /// Code that embeds detour called [`apply_text`] (tests, tools).
    Direct,
    /// At start: the replicas were baking a rollout to this replica's file.
    Start,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::FileChange => "file_change",
            Self::Start => "start",
            Self::Sighup => "sighup",
            Self::Admin => "admin",
            Self::Direct => "direct",
        }
    }
}

/// What a reload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The new config serves every request now.
    Applied,
    /// The new config bakes on a canary share first.
    RolloutStarted,
    /// The file is the config already serving: nothing to do.
    Unchanged,
    /// Invalid, unreadable or failed to build: the running config stays.
    Rejected,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Applied => "applied",
            Self::RolloutStarted => "rollout_started",
            Self::Unchanged => "unchanged",
            Self::Rejected => "rejected",
        }
    }
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The control plane's handle on one gateway's config: applies reloads,
/// remembers what the last one did (for `GET /admin/reload`), and runs the
/// rollout judge on the runtime it was made on (the main one: never the
/// admin listener's, which only asks for a reload).
#[derive(Debug)]
pub struct Reloader {
    gw: Arc<Gateway>,
    runtime: Option<tokio::runtime::Handle>,
    last: RwLock<Option<ReloadStatus>>,
}

impl Reloader {
    /// Made inside the runtime its judges should run on.
    pub fn new(gw: Arc<Gateway>) -> Arc<Self> {
        Arc::new(Self {
            gw,
            runtime: tokio::runtime::Handle::try_current().ok(),
            last: RwLock::new(None),
        })
    }

    pub fn gateway(&self) -> &Arc<Gateway> {
        &self.gw
    }

    /// Re-reads the config file and applies it.
    pub fn reload(&self, trigger: Trigger) -> ReloadStatus {
        self.record(reload_on(&self.gw, trigger, self.runtime.as_ref()))
    }

    /// What the last reload did.
    pub fn last(&self) -> Option<ReloadStatus> {
        self.last.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn record(&self, status: ReloadStatus) -> ReloadStatus {
        *self.last.write().unwrap_or_else(|e| e.into_inner()) = Some(status.clone());
        status
    }
}

/// Re-reads the gateway's config file and applies it.
fn reload_on(
    gw: &Arc<Gateway>,
    trigger: Trigger,
    rt: Option<&tokio::runtime::Handle>,
) -> ReloadStatus {
    let Some(path) = gw.ops().config_path else {
        return finish(
            gw,
            trigger,
            Outcome::Rejected,
            vec!["this gateway has no config file to reload".into()],
        );
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) => {
            let error = format!("{}: cannot read config: {e}", path.display());
            return finish(gw, trigger, Outcome::Rejected, vec![error]);
        }
    };
    apply(gw, &text, &path.display().to_string(), trigger, rt)
}

/// Validates `text` and applies it (swap or rollout); a rollout's judge runs
/// on the current runtime.
pub fn apply_text(gw: &Arc<Gateway>, text: &str, file: &str, trigger: Trigger) -> ReloadStatus {
    let rt = tokio::runtime::Handle::try_current().ok();
    apply(gw, text, file, trigger, rt.as_ref())
}

fn apply(
    gw: &Arc<Gateway>,
    text: &str,
    file: &str,
    trigger: Trigger,
    rt: Option<&tokio::runtime::Handle>,
) -> ReloadStatus {
    let status = load_and_apply(gw, text, file, trigger, rt);
    // Parsing's peak (and, once requests let go of it, the old config) is
    // freed; hand it back rather than wait for this thread's next allocation.
    detour_alloc::give_back_now();
    status
}

fn load_and_apply(
    gw: &Arc<Gateway>,
    text: &str,
    file: &str,
    trigger: Trigger,
    rt: Option<&tokio::runtime::Handle>,
) -> ReloadStatus {
    if gw.source().as_deref() == Some(text) && gw.rollout().is_none() {
        return finish(gw, trigger, Outcome::Unchanged, Vec::new());
    }
    let cfg = match config::load_str(text, file) {
        Ok(c) => c,
        Err(ConfigError::Invalid(diags)) => {
            let errors: Vec<String> = diags.iter().map(ToString::to_string).collect();
            for e in &errors {
                tracing::error!(trigger = trigger.as_str(), "config refused: {e}");
            }
            return finish(gw, trigger, Outcome::Rejected, errors);
        }
        Err(e) => return finish(gw, trigger, Outcome::Rejected, vec![e.to_string()]),
    };
    for w in &cfg.warnings {
        tracing::warn!(trigger = trigger.as_str(), "config: {w}");
    }
    match cfg.rollout.filter(|p| p.canary_percent > 0.0) {
        Some(policy) => match gw.start_rollout(cfg, policy, Some(text.to_owned())) {
            Ok(rollout) => {
                tracing::warn!(
                    trigger = trigger.as_str(),
                    canary_percent = policy.canary_percent,
                    bake_s = policy.bake.as_secs_f64(),
                    "new config baking on a canary share"
                );
                if let Some(rt) = rt {
                    rt.spawn(judge(Arc::clone(gw), rollout));
                }
                finish(gw, trigger, Outcome::RolloutStarted, Vec::new())
            }
            Err(e) => finish(gw, trigger, Outcome::Rejected, vec![e.to_string()]),
        },
        None => match gw.swap_with_source(cfg, Some(text.to_owned())) {
            Ok(()) => {
                tracing::warn!(trigger = trigger.as_str(), "new config applied");
                finish(gw, trigger, Outcome::Applied, Vec::new())
            }
            Err(e) => finish(gw, trigger, Outcome::Rejected, vec![e.to_string()]),
        },
    }
}

fn finish(gw: &Gateway, trigger: Trigger, outcome: Outcome, errors: Vec<String>) -> ReloadStatus {
    let status = ReloadStatus {
        at_unix_ms: now_unix_ms(),
        trigger,
        outcome,
        errors,
    };
    if outcome == Outcome::Rejected {
        gw.count_rejected_config();
    }
    status
}

/// Watches a rollout until it is promoted, rolled back, or replaced. With
/// shared state, the verdict is the replicas' ([`crate::rollout::shared`]);
/// while Redis cannot be asked, this replica judges its own cohorts.
async fn judge(gw: Arc<Gateway>, rollout: Arc<Rollout>) {
    let tick = (rollout.policy.bake / 8).clamp(Duration::from_millis(50), Duration::from_secs(5));
    let mut sync = match gw.shared() {
        Some(s) => crate::rollout::shared::Sync::start(Arc::clone(s), &rollout, gw.source()).await,
        None => None,
    };
    loop {
        tokio::time::sleep(tick).await;
        let current = gw.rollout();
        if !current.is_some_and(|c| Arc::ptr_eq(&c, &rollout)) {
            return; // promoted or rolled back by hand, or replaced
        }
        let shared = match &mut sync {
            Some(s) => s.tick(&rollout).await.ok(),
            None => None,
        };
        match shared.unwrap_or_else(|| verdict(&rollout)) {
            Verdict::Wait => {}
            Verdict::Promote => {
                gw.promote();
                tracing::warn!(view = ?rollout.view(), "rollout promoted: the new config is stable");
                return;
            }
            Verdict::Rollback(why) => {
                gw.rollback();
                tracing::error!(reason = %why, view = ?rollout.view(), "rollout rolled back: the stable config stays");
                return;
            }
        }
    }
}

/// A replica starting with `text` while the replicas bake a rollout to it
/// serves the stable config and joins the rollout; if they rolled it back,
/// it serves the stable config. Waits up to `wait` for Redis; without an
/// answer, `text` is served as it is.
pub async fn join_replicas_rollout(gw: &Arc<Gateway>, text: &str, file: &str, wait: Duration) {
    use crate::rollout::shared::{join, Joining};
    let Some(shared) = gw.shared() else { return };
    let deadline = tokio::time::Instant::now() + wait;
    while !shared.is_up() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stable = match join(shared, text).await {
        Ok(Joining::Nothing) => return,
        Ok(Joining::Baking { stable }) => (stable, true),
        Ok(Joining::RolledBack { stable }) => (stable, false),
        Err(e) => {
            tracing::warn!("shared state: cannot ask the replicas about a rollout ({e}); serving the config file as it is");
            return;
        }
    };
    let (stable_text, baking) = stable;
    let stable_cfg = match config::load_str(&stable_text, "(the replicas' stable config)") {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("the replicas' stable config does not load here ({e}); serving the config file as it is");
            return;
        }
    };
    if let Err(e) = gw.swap_with_source(stable_cfg, Some(stable_text)) {
        tracing::error!("the replicas' stable config cannot be built here ({e}); serving the config file as it is");
        return;
    }
    if baking {
        tracing::warn!("the replicas are baking this config: serving their stable config and joining the rollout");
        apply_text(gw, text, file, Trigger::Start);
    } else {
        tracing::error!("the replicas rolled this config back: serving their stable config until the file changes");
    }
}

/// Reloads on file changes and `SIGHUP` until the task is dropped.
pub async fn watch(reloader: Arc<Reloader>) {
    let Some(path) = reloader.gw.ops().config_path else {
        return;
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Trigger>(16);
    let _watcher = file_watcher(&path, tx.clone());
    #[cfg(unix)]
    {
        let tx = tx.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let Ok(mut hup) = signal(SignalKind::hangup()) else {
                return;
            };
            while hup.recv().await.is_some() {
                if tx.send(Trigger::Sighup).await.is_err() {
                    return;
                }
            }
        });
    }
    drop(tx);
    while let Some(trigger) = rx.recv().await {
        // Editors write files in several steps: let the burst settle.
        tokio::time::sleep(Duration::from_millis(200)).await;
        while rx.try_recv().is_ok() {}
        let status = reloader.reload(trigger);
        tracing::info!(
            trigger = trigger.as_str(),
            outcome = status.outcome.as_str(),
            "reload"
        );
    }
}

fn file_watcher(
    path: &Path,
    tx: tokio::sync::mpsc::Sender<Trigger>,
) -> Option<notify::RecommendedWatcher> {
    use notify::{RecursiveMode, Watcher};
    let file: PathBuf = path.file_name()?.into();
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if event.kind.is_access() {
            return;
        }
        if event
            .paths
            .iter()
            .any(|p| p.file_name() == Some(file.as_os_str()))
        {
            let _ = tx.try_send(Trigger::FileChange);
        }
    })
    .map_err(|e| tracing::warn!("cannot watch the config file: {e}"))
    .ok()?;
    // The directory, not the file: editors replace files by renaming.
    watcher
        .watch(dir, RecursiveMode::NonRecursive)
        .map_err(|e| tracing::warn!("cannot watch {}: {e}", dir.display()))
        .ok()?;
    Some(watcher)
}

/// The last-known-good config's path in a state directory.
pub fn lkg_path(state_dir: &Path) -> PathBuf {
    state_dir.join("last-known-good.toml")
}

/// Writes the stable config to the state directory once it has served a
/// successful request; checks once a second until the task is dropped.
pub async fn keep_last_known_good(gw: Arc<Gateway>) {
    let Some(dir) = gw.ops().state_dir else {
        return;
    };
    let mut saved: Option<String> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let live = gw.live();
        if !live.served_ok.load(Ordering::Relaxed) {
            continue;
        }
        let Some(text) = gw.source() else { continue };
        if saved.as_deref() == Some(text.as_str()) {
            continue;
        }
        match save_lkg(&dir, &text) {
            Ok(path) => {
                tracing::info!(path = %path.display(), "saved the config as last-known-good");
                saved = Some(text);
            }
            Err(e) => tracing::warn!("cannot save last-known-good in {}: {e}", dir.display()),
        }
    }
}

/// Saves `text` as the last-known-good config, readable by its owner only
/// (0600): the config may hold a literal key.
fn save_lkg(dir: &Path, text: &str) -> std::io::Result<PathBuf> {
    use std::io::Write;
    std::fs::create_dir_all(dir)?;
    let path = lkg_path(dir);
    // Write then rename, so a crash never leaves half a file. The temporary
    // file is created afresh, so it never inherits an older file's mode.
    let tmp = dir.join("last-known-good.toml.tmp");
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&tmp)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `GET /admin/reload` and the log show the same words as before the
    /// enums: operators' scripts read them.
    #[test]
    fn triggers_and_outcomes_keep_their_words() {
        let triggers = [
            (Trigger::FileChange, "file_change"),
            (Trigger::Sighup, "sighup"),
            (Trigger::Admin, "admin"),
            (Trigger::Direct, "direct"),
            (Trigger::Start, "start"),
        ];
        for (t, word) in triggers {
            assert_eq!(
                (t.as_str(), serde_json::json!(t)),
                (word, serde_json::json!(word))
            );
        }
        let outcomes = [
            (Outcome::Applied, "applied"),
            (Outcome::RolloutStarted, "rollout_started"),
            (Outcome::Unchanged, "unchanged"),
            (Outcome::Rejected, "rejected"),
        ];
        for (o, word) in outcomes {
            assert_eq!(
                (o.as_str(), serde_json::json!(o)),
                (word, serde_json::json!(word))
            );
        }
    }

    #[cfg(unix)]
    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    /// The saved config may hold a literal key: only the owner may read it,
    /// even when an older, world-readable temporary file is lying around.
    #[cfg(unix)]
    #[test]
    fn last_known_good_is_readable_by_its_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = save_lkg(dir.path(), "api_key = \"sk-literal\"\n").unwrap();
        assert_eq!(mode(&path), 0o600);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "api_key = \"sk-literal\"\n"
        );

        let stale = dir.path().join("last-known-good.toml.tmp");
        std::fs::write(&stale, "old").unwrap();
        std::fs::set_permissions(&stale, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let path = save_lkg(dir.path(), "second").unwrap();
        assert_eq!(mode(&path), 0o600);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "second");
    }
}
