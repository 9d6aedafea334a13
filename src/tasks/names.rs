//! Which file names are acceptable. A file name is only ever a key (for locks and results),
//! never a path, but it is still refused if it looks like one, so nobody downstream (a client
//! saving the result, an operator's script) is surprised.

use crate::tasks::types::ResultFormat;

const MAX_LEN: usize = 255;

/// The image kind a name's extension announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Declared {
    Png,
    Jpeg,
}

pub fn validate(name: &str) -> Result<Declared, String> {
    if name.is_empty() {
        return Err("file_name is empty".into());
    }
    if name.len() > MAX_LEN {
        return Err(format!("file_name is longer than {MAX_LEN} bytes"));
    }
    if name.contains("..") {
        return Err("file_name must not contain `..`".into());
    }
    if name.contains(['/', '\\']) {
        return Err("file_name must not contain a path separator".into());
    }
    if name.chars().any(char::is_control) {
        return Err("file_name must not contain control characters".into());
    }
    if name.trim() != name {
        return Err("file_name must not start or end with whitespace".into());
    }
    let ext = name.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase());
    match ext.as_deref() {
        Some("png") => Ok(Declared::Png),
        Some("jpg" | "jpeg") => Ok(Declared::Jpeg),
        _ => Err(format!(
            "file_name `{name}` must end in .png, .jpg or .jpeg"
        )),
    }
}

impl Declared {
    pub fn matches(self, format: image::ImageFormat) -> bool {
        matches!(
            (self, format),
            (Self::Png, image::ImageFormat::Png) | (Self::Jpeg, image::ImageFormat::Jpeg)
        )
    }

    pub fn describe(self) -> &'static str {
        match self {
            Self::Png => "PNG",
            Self::Jpeg => "JPEG",
        }
    }
}

impl ResultFormat {
    pub fn output(self) -> crate::imaging::OutputFormat {
        match self {
            Self::Png => crate::imaging::OutputFormat::Png,
            Self::Jpeg => crate::imaging::OutputFormat::Jpeg(95),
            Self::Webp => crate::imaging::OutputFormat::WebP,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_names() {
        assert_eq!(validate("cat.png"), Ok(Declared::Png));
        assert_eq!(validate("Photo 1.JPEG"), Ok(Declared::Jpeg));
        assert_eq!(validate("été.jpg"), Ok(Declared::Jpeg));
    }

    #[test]
    fn refuses_paths_and_odd_names() {
        for bad in [
            "",
            "a/b.png",
            "a\\b.png",
            "../x.png",
            "x..png",
            "a\u{0}.png",
            "a\n.png",
            " a.png",
            "a.gif",
            "png",
        ] {
            assert!(validate(bad).is_err(), "{bad:?} accepted");
        }
        assert!(validate(&format!("{}.png", "a".repeat(300))).is_err());
    }
}
