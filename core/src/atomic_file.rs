//! Files that readers may open at any moment (the checkout record, the mirror manifest): written
//! to a temporary file in the same directory, then renamed over the old one, so a reader sees the
//! old content or the new, never half of it.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use serde::Serialize;

/// Writes `value` as pretty JSON to `path` atomically, creating the directory.
pub fn write_json(path: &Path, value: &impl Serialize) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    serde_json::to_writer_pretty(&mut tmp, value)?;
    tmp.write_all(b"\n")?;
    // Readable by everyone, like a file git writes: pods read the volume as other users, and a
    // temporary file starts as 0600.
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o644))?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}
