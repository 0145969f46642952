//! Cheap, read-only checks of a mirror, in-process with libgit2 (~0.1 ms warm).
//!
//! These catch the mirrors that are plainly unusable — missing, empty, not a repository, a mirror
//! of another repository — before any git process starts. They cannot prove the packs are sound
//! (a damaged pack can pass every cheap check and fail only at checkout), so callers still wrap
//! the whole checkout in a fallback. libgit2 opens the bare repository without git's ownership
//! check, so a mirror owned by another uid reads fine, and it never writes.

use std::path::{Path, PathBuf};

use git2::{Oid, Repository};

use crate::repo_url::RepoUrl;

/// Why a mirror cannot be used. The message is the log's "why".
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MirrorProblem {
    #[error("no mirror at {0}")]
    Missing(PathBuf),
    #[error("{path} is not a bare git repository ({detail}); repopulate the mirror volume")]
    NotARepository { path: PathBuf, detail: String },
    #[error("{0} is an empty repository (no refs); repopulate the mirror volume")]
    Empty(PathBuf),
    #[error(
        "{path} mirrors {mirrors}, not this repository; fix the mirror volume's layout or manifest"
    )]
    OtherRepository { path: PathBuf, mirrors: String },
    #[error("{path} has no remote.origin.url, so it cannot be matched to a repository; repopulate it with populate-mirror")]
    Unidentified { path: PathBuf },
    #[error("{0}: its real path contains a newline, which git's alternates file cannot hold")]
    UnsafePath(PathBuf),
    #[error("pack {} is truncated or does not match its index; repopulate the mirror volume", .0.display())]
    DamagedPack(PathBuf),
}

/// A mirror that passed the cheap checks.
pub struct Mirror {
    /// The path as found under the root (maybe a symlink to a generation).
    pub path: PathBuf,
    /// The resolved path: alternates must name it, so an atomic swap of the published symlink
    /// never changes what a running checkout reads.
    pub real_path: PathBuf,
    repo: Repository,
}

impl std::fmt::Debug for Mirror {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mirror")
            .field("path", &self.path)
            .field("real_path", &self.real_path)
            .finish()
    }
}

/// The hash length of SHA-1 repositories, the only kind the mirrors hold.
const HASH_LEN: u64 = 20;

/// Every pack ends with its checksum, and its index repeats that checksum just before its own.
/// Comparing the two costs two small reads per pack and catches a truncated or half-copied
/// pack, which git would otherwise half-use without a word.
fn check_pack_trailers(pack_dir: &Path) -> Result<(), MirrorProblem> {
    let Ok(entries) = std::fs::read_dir(pack_dir) else {
        return Ok(()); // loose objects only
    };
    for idx in entries.flatten().map(|e| e.path()) {
        if idx.extension().is_none_or(|e| e != "idx") {
            continue;
        }
        let pack = idx.with_extension("pack");
        let from_idx = read_tail(&idx, 2 * HASH_LEN).map(|t| t[..HASH_LEN as usize].to_vec());
        let from_pack = read_tail(&pack, HASH_LEN);
        match (from_idx, from_pack) {
            (Some(a), Some(b)) if a == b => {}
            _ => return Err(MirrorProblem::DamagedPack(pack)),
        }
    }
    Ok(())
}

fn read_tail(path: &Path, len: u64) -> Option<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path).ok()?;
    let size = file.metadata().ok()?.len();
    if size < len {
        return None;
    }
    file.seek(SeekFrom::Start(size - len)).ok()?;
    let mut buf = vec![0; len as usize];
    file.read_exact(&mut buf).ok()?;
    Some(buf)
}

impl Mirror {
    /// Opens `path` and checks that it is a usable bare mirror of `expected`.
    pub fn inspect(path: &Path, expected: &RepoUrl) -> Result<Mirror, MirrorProblem> {
        if !path.exists() {
            return Err(MirrorProblem::Missing(path.to_path_buf()));
        }
        let not_a_repo = |detail: String| MirrorProblem::NotARepository {
            path: path.to_path_buf(),
            detail,
        };
        let real_path = path.canonicalize().map_err(|e| not_a_repo(e.to_string()))?;
        if real_path.to_string_lossy().contains('\n') {
            return Err(MirrorProblem::UnsafePath(path.to_path_buf()));
        }
        let repo = Repository::open_bare(&real_path).map_err(|e| not_a_repo(e.message().into()))?;
        if !repo.is_bare() {
            return Err(not_a_repo("it has a work tree".into()));
        }
        let has_refs = repo
            .references()
            .map_err(|e| not_a_repo(e.message().into()))?
            .next()
            .is_some();
        if !has_refs {
            return Err(MirrorProblem::Empty(path.to_path_buf()));
        }
        check_pack_trailers(&real_path.join("objects/pack"))?;
        let origin = repo
            .find_remote("origin")
            .ok()
            .and_then(|r| r.url().ok().map(str::to_string));
        match origin.as_deref().map(RepoUrl::parse) {
            Some(Ok(mirrors)) if mirrors.identity() == expected.identity() => {}
            Some(Ok(mirrors)) => {
                return Err(MirrorProblem::OtherRepository {
                    path: path.to_path_buf(),
                    mirrors: mirrors.redacted(),
                })
            }
            _ => {
                return Err(MirrorProblem::Unidentified {
                    path: path.to_path_buf(),
                })
            }
        }
        Ok(Mirror {
            path: path.to_path_buf(),
            real_path,
            repo,
        })
    }

    /// Whether the mirror can serve `commit` without the network. A damaged object that libgit2
    /// cannot parse counts as absent: git will then fetch it, or the fallback takes over.
    pub fn has_commit(&self, commit: Oid) -> bool {
        self.repo.find_commit(commit).is_ok()
    }

    /// The branch the mirror's HEAD names (`main` for `refs/heads/main`): the remote's default
    /// branch as of the mirror's last refresh, which is what a clone's `origin/HEAD` points at.
    pub fn default_branch(&self) -> Option<String> {
        let head = self.repo.find_reference("HEAD").ok()?;
        let target = head.symbolic_target().ok()??;
        target.strip_prefix("refs/heads/").map(str::to_string)
    }

    /// The objects directory to write into a new repository's alternates.
    pub fn objects_dir(&self) -> PathBuf {
        self.real_path.join("objects")
    }

    /// Seconds since the mirror last changed, from `FETCH_HEAD` or `packed-refs`, for mirrors
    /// that no manifest describes.
    pub fn age_from_files(&self) -> Option<u64> {
        ["FETCH_HEAD", "packed-refs", "HEAD"]
            .iter()
            .filter_map(|f| {
                std::fs::metadata(self.real_path.join(f))
                    .ok()?
                    .modified()
                    .ok()
            })
            .max()
            .and_then(|t| t.elapsed().ok())
            .map(|d| d.as_secs())
    }
}
