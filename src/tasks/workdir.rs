//! Each instance's own folder under TEMP_DIR, so that instances sharing a TEMP_DIR (several
//! on one host, all with the default) never touch each other's files.
//!
//! - Shared mode: `instance-<id>`, holding only uploads in flight (sources live in the
//!   store). The instance holds an exclusive `flock` on its `.owner` file while it lives; at
//!   start an instance removes the folders of dead ones (whose lock is free), never a live
//!   one's.
//! - One instance on its own: `local-<hash of DATA_DIR>`, stable across restarts, because
//!   its uploads wait there for the tasks recovered at the next start.

use std::fs::File;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::types::hex;
use crate::config::Settings;

const OWNER: &str = ".owner";
const SHARED_PREFIX: &str = "instance-";

/// The folder under `settings.temp_dir` that an instance works in: `instance` is its id in
/// shared mode, `None` for a single instance.
pub fn work_dir(settings: &Settings, instance: Option<&str>) -> PathBuf {
    match instance {
        Some(id) => settings.temp_dir.join(format!("{SHARED_PREFIX}{id}")),
        None => {
            let data = std::path::absolute(&settings.data_dir)
                .unwrap_or_else(|_| settings.data_dir.clone());
            let digest = hex(&Sha256::digest(data.as_os_str().as_encoded_bytes()));
            settings.temp_dir.join(format!("local-{}", &digest[..12]))
        }
    }
}

/// Creates a shared-mode instance's folder and locks it for as long as the returned file is
/// open; removes the folders that instances no longer alive left behind.
pub fn claim_shared(dir: &Path) -> std::io::Result<File> {
    std::fs::create_dir_all(dir)?;
    let owner = File::create(dir.join(OWNER))?;
    owner
        .try_lock()
        .map_err(|e| std::io::Error::other(format!("{} is in use: {e}", dir.display())))?;
    if let Some(parent) = dir.parent() {
        remove_dead_siblings(parent, dir);
    }
    Ok(owner)
}

fn remove_dead_siblings(parent: &Path, ours: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        if path == ours || !name.to_string_lossy().starts_with(SHARED_PREFIX) {
            continue;
        }
        // A folder being set up has no owner file yet: leave it.
        let Ok(owner) = File::open(path.join(OWNER)) else {
            continue;
        };
        if owner.try_lock().is_ok() {
            tracing::info!(dir = %path.display(), "removing the temp folder of an instance that is gone");
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_instance_keeps_its_folder_and_a_dead_one_loses_it() {
        let root = tempfile::tempdir().unwrap();
        let a = root.path().join("instance-a");
        let b = root.path().join("instance-b");
        let held_a = claim_shared(&a).unwrap();
        std::fs::write(a.join("upload-1.part"), b"x").unwrap();
        // A second claim of the same folder fails while it is held.
        assert!(claim_shared(&a).is_err());
        let held_b = claim_shared(&b).unwrap();
        assert!(
            a.join("upload-1.part").exists(),
            "a live sibling is left alone"
        );
        drop(held_a);
        let c = root.path().join("instance-c");
        let _held_c = claim_shared(&c).unwrap();
        assert!(!a.exists(), "the dead instance's folder is removed");
        assert!(b.exists());
        drop(held_b);
    }

    #[test]
    fn a_single_instance_works_in_a_folder_named_by_its_data_dir() {
        let mut s = Settings::for_dirs("/d1".into(), "/t".into(), "/w".into());
        let one = work_dir(&s, None);
        assert_eq!(one, work_dir(&s, None), "stable across restarts");
        assert!(one.starts_with("/t"));
        s.data_dir = "/d2".into();
        assert_ne!(one, work_dir(&s, None));
        assert_eq!(work_dir(&s, Some("x")), PathBuf::from("/t/instance-x"));
    }
}
