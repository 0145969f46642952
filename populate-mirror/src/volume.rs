//! The mirror volume as populate-mirror writes it:
//!
//! ```text
//! <root>/manifest.json
//! <root>/acme/widgets.reference -> ../.generations/acme/widgets.reference/7   (published path)
//! <root>/https---github-com-acme-widgets-git -> acme/widgets.reference      (stock agent's name)
//! <root>/.generations/acme/widgets.reference/6/                              (older, retained)
//! <root>/.generations/acme/widgets.reference/7/                              (current)
//! <root>/.staging/…                                                          (being built)
//! <root>/.populate-mirror.lock
//! ```
//!
//! A generation is built under `.staging`, moved into `.generations` when complete, and published
//! by renaming a new symlink over the published path: one atomic step, so a reader sees the old
//! generation or the new one, never a mix. Readers resolve the symlink when they start (the hook
//! writes the real path into alternates), so a job keeps reading the generation it started on;
//! old generations are removed only by the retention rule. Published generations are never
//! written again. Symlinks are relative, so the volume works wherever it is mounted.
//!
//! The stock agent's name for a mirror (what `git-mirrors-path` with `git-mirrors-skip-update`
//! looks for) is a second symlink, to the published path rather than to a generation: the one
//! rename that publishes a generation switches both names at once, and neither can ever name a
//! different generation from the other.
//!
//! A crash at any moment leaves at most: files under `.staging` and a generation directory
//! numbered above the published one, both removed by the next run, and a stray `.publishing`
//! symlink, replaced by the next publish.

use std::fs::File;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

const GENERATIONS: &str = ".generations";
const STAGING: &str = ".staging";
const LOCK: &str = ".populate-mirror.lock";

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("cannot use the mirror root {}: {source}; check that the volume is mounted read-write there (--root)", root.display())]
    Root {
        root: PathBuf,
        source: std::io::Error,
    },
    #[error("another populate-mirror is writing {} (it holds {LOCK}); let it finish, or forbid concurrent runs (CronJob concurrencyPolicy: Forbid)", root.display())]
    Locked { root: PathBuf },
    #[error("{} exists and is not a generation symlink made by populate-mirror; move it away or choose another --layout", path.display())]
    NotOurs { path: PathBuf },
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The published generation of one mirror.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation {
    pub number: u64,
    /// The generation's directory (under `.generations`).
    pub path: PathBuf,
}

/// The mirror root, locked for this run.
pub struct Volume {
    root: PathBuf,
    staging: PathBuf,
    _lock: Flock<File>,
}

impl Volume {
    /// Locks the root and clears what a crashed run left under `.staging`.
    pub fn open(root: &Path) -> Result<Volume, VolumeError> {
        let at_root = |source| VolumeError::Root {
            root: root.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(root).map_err(at_root)?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(root.join(LOCK))
            .map_err(at_root)?;
        let lock =
            Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(
                |(_, errno)| match errno {
                    Errno::EWOULDBLOCK => VolumeError::Locked {
                        root: root.to_path_buf(),
                    },
                    other => at_root(other.into()),
                },
            )?;
        let staging = root.join(STAGING);
        remove_if_exists(&staging).map_err(at_root)?;
        std::fs::create_dir_all(&staging).map_err(at_root)?;
        Ok(Volume {
            root: root.to_path_buf(),
            staging,
            _lock: lock,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A new, empty staging directory for `rel`'s next generation.
    pub fn stage(&self, rel: &Path) -> Result<PathBuf, VolumeError> {
        let name: String = rel
            .to_string_lossy()
            .chars()
            .map(|c| if c == '/' { '+' } else { c })
            .collect();
        let path = self.staging.join(name);
        remove_if_exists(&path).map_err(|source| io("cannot clear", &path, source))?;
        Ok(path)
    }

    /// The published generation at `rel`, if any.
    pub fn current(&self, rel: &Path) -> Result<Option<Generation>, VolumeError> {
        let published = self.root.join(rel);
        let target = match std::fs::read_link(&published) {
            Ok(target) => target,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(_) if published.exists() => return Err(VolumeError::NotOurs { path: published }),
            Err(source) => return Err(io("cannot read", &published, source)),
        };
        let number = target
            .file_name()
            .and_then(|n| n.to_str()?.parse().ok())
            .filter(|n| relative_target(rel, *n) == target)
            .ok_or(VolumeError::NotOurs {
                path: published.clone(),
            })?;
        Ok(Some(Generation {
            number,
            path: self.generations_dir(rel).join(number.to_string()),
        }))
    }

    /// Moves a complete staged mirror into place as `rel`'s next generation and switches the
    /// published path to it.
    pub fn publish(&self, rel: &Path, staged: &Path) -> Result<Generation, VolumeError> {
        let dir = self.generations_dir(rel);
        std::fs::create_dir_all(&dir).map_err(|e| io("cannot create", &dir, e))?;
        let number = self.numbers(rel)?.last().map_or(1, |n| n + 1);
        let path = dir.join(number.to_string());
        std::fs::rename(staged, &path).map_err(|e| io("cannot move into place", &path, e))?;
        // The replacement time of the previous generation, which retention counts from.
        File::open(&path)
            .and_then(|f| f.set_modified(SystemTime::now()))
            .map_err(|e| io("cannot stamp", &path, e))?;
        let published = self.root.join(rel);
        let parent = published.parent().unwrap_or(&self.root);
        std::fs::create_dir_all(parent).map_err(|e| io("cannot create", parent, e))?;
        let name = published.file_name().unwrap_or_default().to_string_lossy();
        let temporary = parent.join(format!(".{name}.publishing"));
        remove_if_exists(&temporary).map_err(|e| io("cannot clear", &temporary, e))?;
        std::os::unix::fs::symlink(relative_target(rel, number), &temporary)
            .map_err(|e| io("cannot create", &temporary, e))?;
        std::fs::rename(&temporary, &published).map_err(|e| io("cannot publish", &published, e))?;
        Ok(Generation { number, path })
    }

    /// Makes `alias` name the published path `rel` (a symlink to a symlink), unless it already
    /// does. Replaced in one rename, so a reader never finds the alias missing. A directory or
    /// foreign link at `alias` is left alone: `NotOurs`.
    pub fn link_alias(&self, alias: &Path, rel: &Path) -> Result<(), VolumeError> {
        let path = self.root.join(alias);
        let depth = alias.components().count().saturating_sub(1);
        let mut target: PathBuf = std::iter::repeat_n("..", depth).collect();
        target.push(rel);
        match std::fs::read_link(&path) {
            Ok(existing) if existing == target => return Ok(()),
            // Relative: one of ours (populate-mirror makes no other kind), from another layout.
            Ok(existing) if existing.is_relative() => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            _ => return Err(VolumeError::NotOurs { path }),
        }
        let parent = path.parent().unwrap_or(&self.root);
        std::fs::create_dir_all(parent).map_err(|e| io("cannot create", parent, e))?;
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let temporary = parent.join(format!(".{name}.publishing"));
        remove_if_exists(&temporary).map_err(|e| io("cannot clear", &temporary, e))?;
        std::os::unix::fs::symlink(&target, &temporary)
            .map_err(|e| io("cannot create", &temporary, e))?;
        std::fs::rename(&temporary, &path).map_err(|e| io("cannot publish", &path, e))
    }

    /// Removes generations numbered above the published one: a crashed run moved them into
    /// place but never published them.
    pub fn remove_unpublished(&self, rel: &Path) -> Result<(), VolumeError> {
        let current = self.current(rel)?.map_or(0, |g| g.number);
        for n in self.numbers(rel)?.into_iter().filter(|n| *n > current) {
            let path = self.generations_dir(rel).join(n.to_string());
            tracing::info!(
                "removing generation {n} of {}, never published",
                rel.display()
            );
            remove_if_exists(&path).map_err(|e| io("cannot remove", &path, e))?;
        }
        Ok(())
    }

    /// The retention rule: a generation older than the published one is removed when at least
    /// `keep` newer older-generations exist and the generation that replaced it was published more
    /// than `retain_for` ago. Returns the numbers removed.
    pub fn prune(
        &self,
        rel: &Path,
        keep: usize,
        retain_for: Duration,
    ) -> Result<Vec<u64>, VolumeError> {
        let Some(current) = self.current(rel)? else {
            return Ok(Vec::new());
        };
        let numbers = self.numbers(rel)?;
        let dir = self.generations_dir(rel);
        // Read before anything is removed: a generation's successor may go in this same pass.
        let stamps: Vec<Option<SystemTime>> = numbers
            .iter()
            .map(|n| {
                std::fs::metadata(dir.join(n.to_string()))
                    .and_then(|m| m.modified())
                    .ok()
            })
            .collect();
        let published_at = |n: u64| numbers.iter().position(|m| *m == n).and_then(|i| stamps[i]);
        let older: Vec<u64> = numbers
            .iter()
            .copied()
            .filter(|n| *n < current.number)
            .collect();
        let mut removed = Vec::new();
        for (rank, n) in older.iter().rev().enumerate() {
            let successor = numbers.iter().copied().find(|m| m > n);
            let replaced_long_ago = successor
                .and_then(published_at)
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age >= retain_for);
            if rank >= keep && replaced_long_ago {
                let path = dir.join(n.to_string());
                remove_if_exists(&path).map_err(|e| io("cannot remove", &path, e))?;
                removed.push(*n);
            }
        }
        Ok(removed)
    }

    fn generations_dir(&self, rel: &Path) -> PathBuf {
        self.root.join(GENERATIONS).join(rel)
    }

    /// The generation numbers present for `rel`, ascending.
    fn numbers(&self, rel: &Path) -> Result<Vec<u64>, VolumeError> {
        let dir = self.generations_dir(rel);
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io("cannot list", &dir, e)),
        };
        let mut numbers: Vec<u64> = entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect();
        numbers.sort_unstable();
        Ok(numbers)
    }
}

impl Drop for Volume {
    /// Whatever is still staged was never published: a run that ends, or is stopped, removes it.
    fn drop(&mut self) {
        if let Err(e) = remove_if_exists(&self.staging) {
            tracing::warn!("could not remove {}: {e}", self.staging.display());
        }
    }
}

/// The symlink target for `rel`'s generation `number`, relative to the symlink's directory.
fn relative_target(rel: &Path, number: u64) -> PathBuf {
    let depth = rel
        .components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .count();
    let mut target: PathBuf = std::iter::repeat_n("..", depth.saturating_sub(1)).collect();
    target.push(GENERATIONS);
    target.push(rel);
    target.push(number.to_string());
    target
}

fn remove_if_exists(path: &Path) -> std::io::Result<()> {
    let result = match path.symlink_metadata() {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    match result {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

fn io(what: &'static str, path: &Path, source: std::io::Error) -> VolumeError {
    VolumeError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn staged(volume: &Volume, rel: &Path, marker: &str) -> PathBuf {
        let path = volume.stage(rel).unwrap();
        std::fs::create_dir_all(&path).unwrap();
        std::fs::write(path.join("marker"), marker).unwrap();
        path
    }

    #[test]
    fn publishing_switches_a_relative_symlink_and_keeps_readers_on_their_generation() {
        let dir = tempfile::tempdir().unwrap();
        let volume = Volume::open(dir.path()).unwrap();
        let rel = Path::new("acme/widgets.reference");
        assert_eq!(volume.current(rel).unwrap(), None);
        let first = volume.publish(rel, &staged(&volume, rel, "one")).unwrap();
        let reader = dir.path().join(rel).canonicalize().unwrap();
        let second = volume.publish(rel, &staged(&volume, rel, "two")).unwrap();
        assert_eq!((first.number, second.number), (1, 2));
        assert_eq!(
            std::fs::read_link(dir.path().join(rel)).unwrap(),
            Path::new("../.generations/acme/widgets.reference/2")
        );
        assert_eq!(
            std::fs::read_to_string(reader.join("marker")).unwrap(),
            "one"
        );
        let now = dir.path().join(rel).join("marker");
        assert_eq!(std::fs::read_to_string(now).unwrap(), "two");
        assert_eq!(volume.current(rel).unwrap(), Some(second));
    }

    #[test]
    fn retention_keeps_the_newest_and_the_recently_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let volume = Volume::open(dir.path()).unwrap();
        let rel = Path::new("x.reference");
        for i in 0..5 {
            volume
                .publish(rel, &staged(&volume, rel, &i.to_string()))
                .unwrap();
        }
        assert!(volume
            .prune(rel, 1, Duration::from_secs(3600))
            .unwrap()
            .is_empty());
        assert_eq!(volume.prune(rel, 1, Duration::ZERO).unwrap(), [3, 2, 1]);
        assert_eq!(volume.numbers(rel).unwrap(), [4, 5]);
    }

    #[test]
    fn a_second_run_is_refused_and_leftovers_of_a_crash_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let rel = Path::new("x.reference");
        {
            let volume = Volume::open(dir.path()).unwrap();
            assert!(matches!(
                Volume::open(dir.path()),
                Err(VolumeError::Locked { .. })
            ));
            volume.publish(rel, &staged(&volume, rel, "1")).unwrap();
            // A crash after moving generation 2 into place, before publishing it.
            let orphan = dir.path().join(".generations/x.reference/2");
            std::fs::create_dir_all(&orphan).unwrap();
            std::fs::create_dir_all(dir.path().join(".staging/half")).unwrap();
            std::mem::forget(volume);
        }
        let volume = Volume::open(dir.path()).unwrap_or_else(|_| {
            // The forgotten lock's fd is still open in this process: open a fresh lock file.
            std::fs::remove_file(dir.path().join(LOCK)).unwrap();
            Volume::open(dir.path()).unwrap()
        });
        assert!(!dir.path().join(".staging/half").exists());
        volume.remove_unpublished(rel).unwrap();
        assert_eq!(volume.numbers(rel).unwrap(), [1]);
    }

    #[test]
    fn a_directory_at_the_published_path_is_not_ours() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("x.reference/objects")).unwrap();
        let volume = Volume::open(dir.path()).unwrap();
        assert!(matches!(
            volume.current(Path::new("x.reference")),
            Err(VolumeError::NotOurs { .. })
        ));
    }
}
