//! Where the shipped weights are looked for, so the binary works from any folder.
//!
//! In order: the weights folder the settings name (`UPSCALER_WEIGHTS_DIR`), `./weights`,
//! `weights/` beside the executable, `<exe>/../share/upscaler/weights` (an install prefix),
//! then the source tree the binary was built from (`cargo run`, `cargo install --path .`).
//! Each file is taken from the first folder that has it; a binary built with the
//! `embed-weights` feature falls back to its built-in copy of the shipped files.

use std::path::{Path, PathBuf};

/// Turns the source-tree fallback off when set to `0`, for packagers who want to be sure a
/// binary never reads the folder it was built in.
pub const SOURCE_TREE_VAR: &str = "UPSCALER_SOURCE_WEIGHTS";

/// Why a folder is searched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    Setting,
    WorkingDir,
    BesideExe,
    InstallPrefix,
    SourceTree,
}

impl Why {
    pub fn describe(self) -> &'static str {
        match self {
            Why::Setting => "UPSCALER_WEIGHTS_DIR",
            Why::WorkingDir => "current folder",
            Why::BesideExe => "beside the executable",
            Why::InstallPrefix => "install prefix",
            Why::SourceTree => "source tree",
        }
    }
}

/// One folder searched for weights.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Place {
    pub dir: PathBuf,
    pub why: Why,
}

/// The folders searched for the shipped weights, in order, each once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WeightsDirs {
    places: Vec<Place>,
}

impl WeightsDirs {
    /// The search for this process: `setting` first (relative to the current folder), then
    /// the current folder's, the executable's and the source tree's.
    pub fn search(setting: Option<&Path>) -> Self {
        let cwd = std::env::current_dir().ok();
        let exe = std::env::current_exe().ok();
        let source = (std::env::var_os(SOURCE_TREE_VAR).as_deref() != Some("0".as_ref()))
            .then(|| Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf());
        let dirs = Self::from_parts(setting, cwd.as_deref(), exe.as_deref(), source.as_deref());
        if let Some(dir) = dirs.setting_not_a_folder() {
            tracing::warn!(
                dir = %dir.display(),
                "UPSCALER_WEIGHTS_DIR is not a folder; searching the other places"
            );
        }
        dirs
    }

    fn from_parts(
        setting: Option<&Path>,
        cwd: Option<&Path>,
        exe: Option<&Path>,
        source: Option<&Path>,
    ) -> Self {
        let absolute = |p: &Path| match cwd {
            Some(cwd) => cwd.join(p),
            None => p.to_path_buf(),
        };
        let exe_dir = exe.and_then(Path::parent);
        let candidates = [
            (setting.map(absolute), Why::Setting),
            (cwd.map(|d| d.join("weights")), Why::WorkingDir),
            (exe_dir.map(|d| d.join("weights")), Why::BesideExe),
            (
                exe_dir
                    .and_then(Path::parent)
                    .map(|d| d.join("share").join("upscaler").join("weights")),
                Why::InstallPrefix,
            ),
            (source.map(|d| d.join("weights")), Why::SourceTree),
        ];
        let mut places: Vec<Place> = Vec::new();
        let mut seen = Vec::new();
        for (dir, why) in candidates {
            let Some(dir) = dir else { continue };
            // The same folder reached two ways (the repository's `weights/` from the
            // current folder and as the source tree) is searched once, first as named.
            let key = std::fs::canonicalize(&dir).unwrap_or_else(|_| dir.clone());
            if !seen.contains(&key) {
                seen.push(key);
                places.push(Place { dir, why });
            }
        }
        Self { places }
    }

    pub fn places(&self) -> &[Place] {
        &self.places
    }

    /// The folder the settings name, when it is not a folder (most likely a typo: the search
    /// goes on without it, so a shipped file from elsewhere would be used instead).
    pub fn setting_not_a_folder(&self) -> Option<&Path> {
        self.places
            .iter()
            .find(|p| p.why == Why::Setting && !p.dir.is_dir())
            .map(|p| p.dir.as_path())
    }

    /// The first `<folder>/<file_name>` that is a file.
    pub fn find(&self, file_name: &str) -> Option<PathBuf> {
        self.places
            .iter()
            .map(|p| p.dir.join(file_name))
            .find(|file| file.is_file())
    }

    /// The folders searched, as the error for a missing file lists them.
    pub fn searched(&self) -> String {
        self.places
            .iter()
            .map(|p| format!("{} ({})", p.dir.display(), p.why.describe()))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The sha256 of each shipped weights file, from the manifest in `weights/README.md`.
pub fn manifest() -> Vec<(&'static str, &'static str)> {
    include_str!("../../weights/README.md")
        .lines()
        .filter_map(|line| {
            let cells: Vec<&str> = line
                .split('|')
                .map(|c| c.trim().trim_matches('`'))
                .collect();
            let (file, sha) = (cells.get(1)?, cells.get(cells.len().checked_sub(2)?)?);
            let hex = sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit());
            (file.ends_with(".safetensors") && hex).then_some((*file, *sha))
        })
        .collect()
}

/// The shipped weights compiled into the binary (the `embed-weights` feature), by file name.
#[cfg(feature = "embed-weights")]
pub fn built_in(file_name: &str) -> Option<&'static [u8]> {
    // Statics, not constants: a constant's bytes are copied into every codegen unit that
    // uses them, which doubled the binary's size.
    macro_rules! shipped {
        ($($file:literal),* $(,)?) => {{
            static FILES: &[(&str, &[u8])] = &[
                $(($file, include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/weights/", $file))),)*
            ];
            FILES
        }};
    }
    let files = shipped!(
        "realesrgan-x4plus.safetensors",
        "realesrgan-x4plus-anime.safetensors",
        "realesr-animevideov3.safetensors",
    );
    files
        .iter()
        .find(|(name, _)| *name == file_name)
        .map(|(_, bytes)| *bytes)
}

/// The shipped weights compiled into the binary: none without the `embed-weights` feature.
#[cfg(not(feature = "embed-weights"))]
pub fn built_in(_file_name: &str) -> Option<&'static [u8]> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn searches_in_order_each_folder_once() {
        let dirs = WeightsDirs::from_parts(
            Some(Path::new("w")),
            Some(Path::new("/home/me/pics")),
            Some(Path::new("/opt/up/bin/upscaler")),
            Some(Path::new("/src/upscaler")),
        );
        let got: Vec<(PathBuf, Why)> = dirs
            .places()
            .iter()
            .map(|p| (p.dir.clone(), p.why))
            .collect();
        assert_eq!(
            got,
            [
                (PathBuf::from("/home/me/pics/w"), Why::Setting),
                (PathBuf::from("/home/me/pics/weights"), Why::WorkingDir),
                (PathBuf::from("/opt/up/bin/weights"), Why::BesideExe),
                (
                    PathBuf::from("/opt/up/share/upscaler/weights"),
                    Why::InstallPrefix
                ),
                (PathBuf::from("/src/upscaler/weights"), Why::SourceTree),
            ]
        );
        // Run from the source tree: its `weights/` is searched once, as the current folder's.
        let dirs = WeightsDirs::from_parts(
            None,
            Some(Path::new("/src/upscaler")),
            Some(Path::new("/src/upscaler/target/debug/upscaler")),
            Some(Path::new("/src/upscaler")),
        );
        let whys: Vec<Why> = dirs.places().iter().map(|p| p.why).collect();
        assert_eq!(
            whys,
            [Why::WorkingDir, Why::BesideExe, Why::InstallPrefix],
            "{dirs:?}"
        );
    }

    #[test]
    fn the_manifest_lists_every_shipped_file_and_its_hash() {
        use sha2::Digest;
        let manifest = manifest();
        // Each shipped file once (the x2 and x3 video models share the x4 one's weights).
        let mut shipped: Vec<String> = Vec::new();
        for spec in crate::model::REGISTRY.iter().filter(|s| s.shipped) {
            if !shipped.contains(&spec.weights_file_name()) {
                shipped.push(spec.weights_file_name());
            }
        }
        let listed: Vec<String> = manifest.iter().map(|(f, _)| f.to_string()).collect();
        assert_eq!(listed, shipped);
        for (file, sha) in manifest {
            let path = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("weights")
                .join(file);
            let bytes = std::fs::read(&path).unwrap();
            let got = crate::tasks::types::hex(&sha2::Sha256::digest(&bytes));
            assert_eq!(got, sha, "{file}");
            // With `embed-weights`, every shipped file is built in, byte for byte.
            let embedded = built_in(file);
            assert_eq!(
                embedded.is_some(),
                cfg!(feature = "embed-weights"),
                "{file}"
            );
            if let Some(embedded) = embedded {
                assert!(embedded == bytes.as_slice(), "{file}: built in as shipped");
            }
        }
    }

    #[test]
    fn finds_the_first_folder_with_the_file() {
        let (setting, cwd) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let dirs = WeightsDirs::from_parts(Some(setting.path()), Some(cwd.path()), None, None);
        assert_eq!(dirs.find("m.safetensors"), None);
        std::fs::create_dir(cwd.path().join("weights")).unwrap();
        std::fs::write(cwd.path().join("weights/m.safetensors"), b"x").unwrap();
        assert_eq!(
            dirs.find("m.safetensors"),
            Some(cwd.path().join("weights/m.safetensors"))
        );
        std::fs::write(setting.path().join("m.safetensors"), b"x").unwrap();
        assert_eq!(
            dirs.find("m.safetensors"),
            Some(setting.path().join("m.safetensors")),
            "the setting's folder comes first"
        );
        assert!(dirs.searched().contains("(UPSCALER_WEIGHTS_DIR)"));
        assert_eq!(dirs.setting_not_a_folder(), None);
        let typo = setting.path().join("nope");
        let dirs = WeightsDirs::from_parts(Some(&typo), Some(cwd.path()), None, None);
        assert_eq!(dirs.setting_not_a_folder(), Some(typo.as_path()));
        assert_eq!(
            dirs.find("m.safetensors"),
            Some(cwd.path().join("weights/m.safetensors")),
            "the search goes on without it"
        );
    }
}
