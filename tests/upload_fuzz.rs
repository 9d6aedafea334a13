//! Property-based fuzzing of the upload path.
//!
//! Two layers are covered:
//! - the image functions an upload goes through (`imaging::sniff_format`, `probe`, `decode`)
//!   on arbitrary bytes, on valid PNG/JPEG/WebP files that are truncated, bit-flipped or
//!   spliced, and on forged headers that claim any dimensions;
//! - `TaskService::upload` end to end on the embedded backends, with arbitrary metadata (file
//!   names with path separators, control characters, odd unicode or 255+ bytes; unknown
//!   models; NaN/infinite/negative outscale; any tile) and byte streams cut at random points.
//!
//! The properties: nothing panics; a refusal is one of the kinds a client can act on
//! (InvalidArgument, TooLarge, AlreadyExists, QueueFull, or Aborted when the stream broke),
//! never Internal, and the one the inputs call for; a valid upload is accepted, its task
//! succeeds, and the same upload again is answered from the stored result; a refused upload
//! leaves no `upload-*.part` file, no task source and no file-name lock behind. A counting
//! allocator also checks that no forged header makes a decoder allocate beyond its budget.
//!
//! Cases per property: `PROPTEST_CASES` (64 by default, so `cargo test` stays quick).
//! `scripts/fuzz` runs the same properties for longer, within a time limit. A failure is
//! shrunk to a minimal input, which the panic message prints; its seed is saved in
//! `tests/upload_fuzz.proptest-regressions` and replayed first on every later run, so commit
//! that file. A confirmed bug also gets a plain `#[test]` with its minimal input at the end
//! of this file, fixed together with the bug: the properties carry no exceptions.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use image::{DynamicImage, ImageFormat, Rgba, RgbaImage};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, FileFailurePersistence, RngSeed, TestCaseError, TestRunner};
use sha2::{Digest, Sha256};
use upscaler::imaging::{self, ImagingError};
use upscaler::locks::memory::MemoryLocks;
use upscaler::store::embedded::EmbeddedStore;
use upscaler::tasks::names::{self, Declared};
use upscaler::tasks::types::{hex, ResultFormat, TaskRecord, TaskState};
use upscaler::tasks::{Error, OutcomeKind, TaskService, UploadMeta};
use upscaler::Settings;

// ---------------------------------------------------------------------------------------
// Limits and configuration
// ---------------------------------------------------------------------------------------

/// Cases per property when `PROPTEST_CASES` is unset.
const DEFAULT_CASES: u32 = 64;

/// The pixel limit of the image-function properties: small, so forged headers that claim
/// more are refused before anything is allocated for them.
const SMALL_MAX_PIXELS: u64 = 64 * 64;

/// The service's limits in the upload property. Test images go up to 40 x 40 pixels and a
/// few KiB, so both limits are hit by some cases and passed by others.
const SERVICE_MAX_PIXELS: u64 = 32 * 32;
const SERVICE_MAX_UPLOAD_BYTES: u64 = 4096;

/// The cheapest shipped model. Accepted uploads really run, so the service uses this one
/// by default and the metadata never names the x4plus models (installed, but far slower).
const CHEAP_MODEL: &str = "realesr-animevideov3";

/// One upload, however odd, must answer within this.
const UPLOAD_TIME_LIMIT: Duration = Duration::from_secs(60);

/// How long the accepted tasks of a run may take to finish once the run is over.
const DRAIN_TIME_LIMIT: Duration = Duration::from_secs(300);

fn config(test_name: &'static str) -> Config {
    // `default()` already applies the PROPTEST_* environment variables.
    let mut config = Config::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = DEFAULT_CASES;
    }
    // Failing seeds go to tests/upload_fuzz.proptest-regressions.
    config.source_file = Some(file!());
    config.failure_persistence = Some(Box::new(FileFailurePersistence::WithSource(
        "proptest-regressions",
    )));
    config.test_name = Some(test_name);
    // Shrinking replays uploads against a live service; bound it (milliseconds).
    config.max_shrink_time = 120_000;
    config
}

/// When set (seconds), each property starts no new runner of cases (see `CASES_PER_RUNNER`)
/// that long after it started, and passes with the cases run so far: `scripts/fuzz` uses
/// it to stay within its time limit. A runner whose case failed shrinks it to the end.
const TIME_LIMIT_VAR: &str = "UPLOAD_FUZZ_SECONDS";

fn time_limit() -> Option<Duration> {
    let secs = std::env::var(TIME_LIMIT_VAR).ok()?;
    let secs: f64 = secs
        .parse()
        .unwrap_or_else(|_| panic!("{TIME_LIMIT_VAR}={secs:?} is not a number of seconds"));
    Some(Duration::from_secs_f64(secs))
}

/// Cases per runner under a time limit. A proptest runner only ends once all its cases are
/// generated, so a long run is a series of runners of this many cases (each with its own
/// seeds), and the time limit is checked between them.
const CASES_PER_RUNNER: u32 = 1000;

/// Runs one property, and prints how many cases passed and how long they took (visible
/// with `--nocapture`; `scripts/fuzz` adds these lines up).
fn check<S: Strategy>(
    name: &'static str,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) {
    let cases = config(name).cases;
    let started = Instant::now();
    let deadline = time_limit().map(|limit| started + limit);
    let (mut ran, mut runners) = (0u64, 0u64);
    while ran < u64::from(cases) && deadline.is_none_or(|d| Instant::now() < d) {
        let mut config = config(name);
        let left = u64::from(cases) - ran;
        if deadline.is_some() {
            config.cases = left.min(u64::from(CASES_PER_RUNNER)) as u32;
            // A fixed seed still gives each runner other cases.
            if let RngSeed::Fixed(seed) = config.rng_seed {
                config.rng_seed = RngSeed::Fixed(seed.wrapping_add(runners));
            }
        }
        let mut runner = TestRunner::new(config.clone());
        if let Err(e) = runner.run(&strategy, &test) {
            panic!("{name}: {e}");
        }
        ran += u64::from(config.cases);
        runners += 1;
    }
    let stopped = if ran < u64::from(cases) {
        " (time limit reached)"
    } else {
        ""
    };
    eprintln!(
        "upload_fuzz: {name}: {ran} cases passed in {:.2}s{stopped}",
        started.elapsed().as_secs_f64(),
    );
}

// ---------------------------------------------------------------------------------------
// Allocation watch
// ---------------------------------------------------------------------------------------

/// Any single allocation over this fails at once, so a decoder that trusts a forged header
/// aborts the run with "memory allocation of N bytes failed" instead of swapping.
const ALLOCATION_HARD_LIMIT: usize = 1 << 30;

/// The largest single allocation one `decode` with `SMALL_MAX_PIXELS` may make.
/// `imaging::decode` gives the image crate 8 bytes a pixel plus 64 MiB of scratch.
const DECODE_ALLOCATION_LIMIT: usize = 96 << 20;

/// The system allocator, noting the largest request each thread makes.
struct WatchedAllocator;

thread_local! {
    static LARGEST_ALLOCATION: Cell<usize> = const { Cell::new(0) };
}

fn note_allocation(size: usize) {
    let _ = LARGEST_ALLOCATION.try_with(|l| l.set(l.get().max(size)));
}

// SAFETY: every call is forwarded unchanged to `System`, or refused with a null pointer,
// which `GlobalAlloc` allows.
unsafe impl GlobalAlloc for WatchedAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_allocation(layout.size());
        if layout.size() > ALLOCATION_HARD_LIMIT {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's guarantees on `layout` are passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_allocation(layout.size());
        if layout.size() > ALLOCATION_HARD_LIMIT {
            return std::ptr::null_mut();
        }
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_allocation(new_size);
        if new_size > ALLOCATION_HARD_LIMIT {
            return std::ptr::null_mut();
        }
        // SAFETY: `ptr` came from this allocator, which is `System` underneath.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as for `realloc`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: WatchedAllocator = WatchedAllocator;

/// Runs `f` and returns its result with the largest single allocation it made on this
/// thread.
fn largest_allocation<R>(f: impl FnOnce() -> R) -> (R, usize) {
    LARGEST_ALLOCATION.with(|l| l.set(0));
    let r = f();
    (r, LARGEST_ALLOCATION.with(Cell::get))
}

// ---------------------------------------------------------------------------------------
// Test images
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Codec {
    Png,
    Jpeg,
    WebP,
}

impl Codec {
    fn format(self) -> ImageFormat {
        match self {
            Codec::Png => ImageFormat::Png,
            Codec::Jpeg => ImageFormat::Jpeg,
            Codec::WebP => ImageFormat::WebP,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pixels {
    Gray8,
    GrayAlpha8,
    Rgb8,
    Rgba8,
    Gray16,
    Rgb16,
    Rgba16,
}

/// A small image, described rather than stored so a failing case prints readably and can be
/// rebuilt with `ImageSpec::encode`.
#[derive(Debug, Clone, Copy)]
struct ImageSpec {
    codec: Codec,
    pixels: Pixels,
    width: u32,
    height: u32,
    seed: u8,
    /// Noise compresses badly: noisy images are the large ones.
    noisy: bool,
}

impl ImageSpec {
    /// The pixel layout actually written: JPEG has no alpha and no 16 bits, the WebP
    /// encoder takes 8-bit RGB(A) only.
    fn written_pixels(&self) -> Pixels {
        use Pixels::*;
        match (self.codec, self.pixels) {
            (Codec::Png, p) => p,
            (Codec::Jpeg, Gray8 | GrayAlpha8 | Gray16) => Gray8,
            (Codec::Jpeg, _) => Rgb8,
            (Codec::WebP, GrayAlpha8 | Rgba8 | Rgba16) => Rgba8,
            (Codec::WebP, _) => Rgb8,
        }
    }

    fn has_alpha(&self) -> bool {
        matches!(
            self.written_pixels(),
            Pixels::GrayAlpha8 | Pixels::Rgba8 | Pixels::Rgba16
        )
    }

    fn pixel_count(&self) -> u64 {
        u64::from(self.width) * u64::from(self.height)
    }

    fn encode(&self) -> Vec<u8> {
        let seed = u32::from(self.seed);
        let mut state = seed.wrapping_mul(2_654_435_761) | 1;
        let noisy = self.noisy;
        let mut value = move |x: u32, y: u32, channel: u32| -> u8 {
            if noisy {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                (state >> 24) as u8
            } else {
                (x.wrapping_mul(7) ^ y.wrapping_mul(5) ^ seed ^ channel.wrapping_mul(64)) as u8
            }
        };
        let rgba = RgbaImage::from_fn(self.width, self.height, |x, y| {
            Rgba([
                value(x, y, 0),
                value(x, y, 1),
                value(x, y, 2),
                value(x, y, 3),
            ])
        });
        let rgba = DynamicImage::ImageRgba8(rgba);
        let img = match self.written_pixels() {
            Pixels::Gray8 => DynamicImage::ImageLuma8(rgba.to_luma8()),
            Pixels::GrayAlpha8 => DynamicImage::ImageLumaA8(rgba.to_luma_alpha8()),
            Pixels::Rgb8 => DynamicImage::ImageRgb8(rgba.to_rgb8()),
            Pixels::Rgba8 => rgba,
            Pixels::Gray16 => DynamicImage::ImageLuma16(rgba.to_luma16()),
            Pixels::Rgb16 => DynamicImage::ImageRgb16(rgba.to_rgb16()),
            Pixels::Rgba16 => DynamicImage::ImageRgba16(rgba.to_rgba16()),
        };
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, self.codec.format())
            .unwrap_or_else(|e| panic!("cannot encode the test image {self:?}: {e}"));
        out.into_inner()
    }
}

fn image_spec(max_side: u32, codecs: Vec<Codec>) -> impl Strategy<Value = ImageSpec> {
    use Pixels::*;
    (
        prop::sample::select(codecs),
        prop::sample::select(vec![Gray8, GrayAlpha8, Rgb8, Rgba8, Gray16, Rgb16, Rgba16]),
        1..=max_side,
        1..=max_side,
        any::<u8>(),
        any::<bool>(),
    )
        .prop_map(|(codec, pixels, width, height, seed, noisy)| ImageSpec {
            codec,
            pixels,
            width,
            height,
            seed,
            noisy,
        })
}

/// How a valid file is damaged before use.
#[derive(Debug, Clone)]
enum Damage {
    None,
    /// Cut at this point (never the full length).
    Truncate(Index),
    /// XOR these bytes with non-zero masks.
    Flip(Vec<(Index, u8)>),
    /// Overwrite from this point with these bytes.
    Splice(Index, Vec<u8>),
    /// Trailing bytes after the end of the image.
    Append(Vec<u8>),
}

impl Damage {
    fn apply(&self, mut bytes: Vec<u8>) -> Vec<u8> {
        match self {
            Damage::None => {}
            Damage::Truncate(at) => bytes.truncate(at.index(bytes.len())),
            Damage::Flip(flips) => {
                let n = bytes.len();
                for (at, mask) in flips {
                    bytes[at.index(n)] ^= mask;
                }
            }
            Damage::Splice(at, with) => {
                let start = at.index(bytes.len());
                for (i, b) in with.iter().enumerate() {
                    match bytes.get_mut(start + i) {
                        Some(slot) => *slot = *b,
                        None => bytes.push(*b),
                    }
                }
            }
            Damage::Append(tail) => bytes.extend_from_slice(tail),
        }
        bytes
    }
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        2 => Just(Damage::None),
        3 => any::<Index>().prop_map(Damage::Truncate),
        3 => prop::collection::vec((any::<Index>(), 1..=255u8), 1..8).prop_map(Damage::Flip),
        1 => (any::<Index>(), prop::collection::vec(any::<u8>(), 1..64))
            .prop_map(|(at, with)| Damage::Splice(at, with)),
        1 => prop::collection::vec(any::<u8>(), 1..4096).prop_map(Damage::Append),
    ]
}

const PNG_SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";

/// Bytes that start like an image, so they get past the magic-byte check.
fn magic(codec: Codec) -> &'static [u8] {
    match codec {
        Codec::Png => PNG_SIGNATURE,
        Codec::Jpeg => b"\xff\xd8\xff",
        Codec::WebP => b"RIFF\x00\x01\x00\x00WEBP",
    }
}

fn png_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let mut crc = crc32fast::Hasher::new();
    crc.update(kind);
    crc.update(data);
    out.extend_from_slice(&crc.finalize().to_be_bytes());
}

/// A PNG whose header (with a correct CRC) claims `width` x `height`, followed by `data`
/// as its only IDAT chunk.
fn forged_png(width: u32, height: u32, depth: u8, color: u8, data: &[u8]) -> Vec<u8> {
    let mut out = PNG_SIGNATURE.to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[depth, color, 0, 0, 0]);
    png_chunk(&mut out, b"IHDR", &ihdr);
    if !data.is_empty() {
        png_chunk(&mut out, b"IDAT", data);
    }
    png_chunk(&mut out, b"IEND", &[]);
    out
}

/// A real JPEG whose frame header (SOF0) is patched to claim `width` x `height`.
fn forged_jpeg(spec: &ImageSpec, width: u16, height: u16) -> Vec<u8> {
    let mut bytes = ImageSpec {
        codec: Codec::Jpeg,
        ..*spec
    }
    .encode();
    let sof = bytes
        .windows(2)
        .position(|w| w == [0xff, 0xc0])
        .expect("the JPEG encoder writes a baseline frame header");
    bytes[sof + 5..sof + 7].copy_from_slice(&height.to_be_bytes());
    bytes[sof + 7..sof + 9].copy_from_slice(&width.to_be_bytes());
    bytes
}

/// A lossless WebP header claiming `width` x `height` (1..=16384 each), then `data`.
fn forged_webp(width: u16, height: u16, data: &[u8]) -> Vec<u8> {
    let bits = u32::from(width.clamp(1, 16384) - 1) | (u32::from(height.clamp(1, 16384) - 1) << 14);
    let mut vp8l = vec![0x2f];
    vp8l.extend_from_slice(&bits.to_le_bytes());
    vp8l.extend_from_slice(data);
    let mut out = b"RIFF".to_vec();
    out.extend_from_slice(&(4 + 8 + vp8l.len() as u32).to_le_bytes());
    out.extend_from_slice(b"WEBPVP8L");
    out.extend_from_slice(&(vp8l.len() as u32).to_le_bytes());
    out.extend_from_slice(&vp8l);
    out
}

// ---------------------------------------------------------------------------------------
// The image functions
// ---------------------------------------------------------------------------------------

/// What must hold for any input to `sniff_format`, `probe` and `decode`; returns the
/// dimensions `decode` produced, if it succeeded.
fn check_image_functions(bytes: &[u8]) -> Result<Option<(u32, u32)>, TestCaseError> {
    let sniffed = imaging::sniff_format(bytes);
    if let Ok(f) = &sniffed {
        prop_assert!(
            matches!(f, ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP),
            "sniffed an unsupported format {f:?}"
        );
    }
    let probed = imaging::probe(bytes, SMALL_MAX_PIXELS);
    let (decoded, largest) = largest_allocation(|| imaging::decode(bytes, SMALL_MAX_PIXELS));
    prop_assert!(
        largest <= DECODE_ALLOCATION_LIMIT,
        "decoding {} bytes allocated {largest} bytes at once",
        bytes.len()
    );
    if sniffed.is_err() {
        prop_assert!(
            matches!(probed, Err(ImagingError::UnsupportedFormat)),
            "probe: {probed:?}"
        );
        prop_assert!(
            matches!(decoded, Err(ImagingError::UnsupportedFormat)),
            "decode: {:?}",
            decoded.map(|i| (i.width(), i.height()))
        );
        return Ok(None);
    }
    if let Ok(info) = &probed {
        prop_assert_eq!(Some(info.format), sniffed.ok());
        prop_assert!(info.width > 0 && info.height > 0);
        prop_assert!(u64::from(info.width) * u64::from(info.height) <= SMALL_MAX_PIXELS);
    }
    match decoded {
        Ok(img) => {
            let info = match probed {
                Ok(info) => info,
                Err(e) => return Err(TestCaseError::fail(format!("decoded, but probe: {e}"))),
            };
            let dims = (img.width(), img.height());
            // EXIF orientation may swap the sides.
            prop_assert!(
                dims == (info.width, info.height) || dims == (info.height, info.width),
                "decoded {dims:?}, header said {}x{}",
                info.width,
                info.height
            );
            Ok(Some(dims))
        }
        Err(ImagingError::Encode(e)) => Err(TestCaseError::fail(format!("decode: Encode({e})"))),
        Err(_) => Ok(None),
    }
}

#[test]
fn image_functions_on_arbitrary_bytes() {
    let bytes = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..512),
        (
            prop::sample::select(vec![Codec::Png, Codec::Jpeg, Codec::WebP]),
            prop::collection::vec(any::<u8>(), 0..512),
        )
            .prop_map(|(codec, tail)| [magic(codec), &tail[..]].concat()),
    ];
    check("image_functions_on_arbitrary_bytes", bytes, |bytes| {
        check_image_functions(&bytes).map(drop)
    });
}

#[test]
fn image_functions_on_damaged_images() {
    let codecs = vec![Codec::Png, Codec::Jpeg, Codec::WebP];
    check(
        "image_functions_on_damaged_images",
        (image_spec(80, codecs), damage()),
        |(spec, damage)| {
            let bytes = damage.apply(spec.encode());
            let decoded = check_image_functions(&bytes)?;
            if matches!(damage, Damage::None) {
                if spec.pixel_count() <= SMALL_MAX_PIXELS {
                    prop_assert_eq!(decoded, Some((spec.width, spec.height)));
                } else {
                    let decoded = imaging::decode(&bytes, SMALL_MAX_PIXELS);
                    prop_assert!(
                        matches!(decoded, Err(ImagingError::TooLarge { .. })),
                        "an image over the pixel limit gave {:?}",
                        decoded.map(|i| (i.width(), i.height()))
                    );
                }
            }
            Ok(())
        },
    );
}

/// PNG colour type and bit depth pairs the format allows.
const PNG_MODES: [(u8, u8); 15] = [
    (1, 0),
    (2, 0),
    (4, 0),
    (8, 0),
    (16, 0),
    (8, 2),
    (16, 2),
    (1, 3),
    (2, 3),
    (4, 3),
    (8, 3),
    (8, 4),
    (16, 4),
    (8, 6),
    (16, 6),
];

/// A file whose header claims some size, and whether that header is well-formed.
#[derive(Debug, Clone)]
struct Forged {
    codec: Codec,
    width: u32,
    height: u32,
    well_formed: bool,
    bytes: Vec<u8>,
}

fn forged() -> impl Strategy<Value = Forged> {
    let data = prop::collection::vec(any::<u8>(), 0..256);
    let png_mode = prop_oneof![
        4 => prop::sample::select(PNG_MODES.to_vec()),
        1 => (any::<u8>(), any::<u8>()),
    ];
    let dimension = prop_oneof![
        Just(0u32),
        1..=100u32,
        1..=100_000u32,
        Just(u32::MAX),
        Just(1 << 31),
        any::<u32>()
    ];
    prop_oneof![
        (dimension.clone(), dimension, png_mode, data.clone()).prop_map(
            |(width, height, (depth, color), data)| Forged {
                codec: Codec::Png,
                width,
                height,
                // The format caps each side at 2^31 - 1, and requires image data.
                well_formed: PNG_MODES.contains(&(depth, color))
                    && (1..1 << 31).contains(&width)
                    && (1..1 << 31).contains(&height)
                    && !data.is_empty(),
                bytes: forged_png(width, height, depth, color, &data),
            }
        ),
        (
            image_spec(16, vec![Codec::Jpeg]),
            prop_oneof![1..=100u16, any::<u16>()],
            prop_oneof![1..=100u16, any::<u16>()],
        )
            .prop_map(|(spec, width, height)| Forged {
                codec: Codec::Jpeg,
                width: u32::from(width),
                height: u32::from(height),
                // A zero height means "given later" (DNL), which decoders may refuse.
                well_formed: width > 0 && height > 0,
                bytes: forged_jpeg(&spec, width, height),
            }),
        (1..=16384u16, 1..=16384u16, data).prop_map(|(width, height, data)| Forged {
            codec: Codec::WebP,
            width: u32::from(width),
            height: u32::from(height),
            // image-webp 0.2.4 reads a lossless side of 16384 as 0 (it adds one before
            // masking to 14 bits), so such a header is refused as `Empty`.
            well_formed: width < 16384 && height < 16384,
            bytes: forged_webp(width, height, &data),
        }),
    ]
}

/// Headers that claim any size, up to billions of pixels: refused from the header alone,
/// and as too large (not as undecodable) when the header is well-formed.
#[test]
fn image_functions_on_forged_headers() {
    check("image_functions_on_forged_headers", forged(), |forged| {
        let Forged {
            codec,
            width,
            height,
            well_formed,
            ref bytes,
        } = forged;
        check_image_functions(bytes)?;
        let claimed = u64::from(width) * u64::from(height);
        let probed = imaging::probe(bytes, SMALL_MAX_PIXELS);
        if claimed == 0 || claimed > SMALL_MAX_PIXELS {
            prop_assert!(
                probed.is_err(),
                "probe accepted {width}x{height}: {probed:?}"
            );
        }
        if well_formed && claimed > SMALL_MAX_PIXELS {
            prop_assert!(
                matches!(probed, Err(ImagingError::TooLarge { .. })),
                "a well-formed {width}x{height} header: {probed:?}"
            );
        }
        if let Ok(info) = probed {
            prop_assert_eq!(info.format, codec.format());
            prop_assert_eq!((info.width, info.height), (width, height));
        }
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------
// File names
// ---------------------------------------------------------------------------------------

fn extension() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        ".png", ".PNG", ".Png", ".jpg", ".JPG", ".jpeg", ".JPEG", ".gif", ".webp", "", ".",
        ".png ", ".png\n", ".png/", ".png\0", "..png", ".jpg.png", ".png.jpg",
    ])
}

fn chars(max: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(any::<char>(), 0..max).prop_map(|v| v.into_iter().collect())
}

fn file_name() -> impl Strategy<Value = String> {
    prop_oneof![
        // A few fixed names, so uploads collide: the same name with the same or other bytes.
        4 => prop::sample::select(vec!["a.png", "b.jpg", "c.jpeg", "Same.PNG", "été 1.png"])
            .prop_map(String::from),
        3 => ("[a-zA-Z0-9 _.-]{1,12}", extension()).prop_map(|(stem, ext)| stem + ext),
        // Any characters: control characters, surrogates' neighbours, combining marks...
        2 => (chars(16), extension()).prop_map(|(stem, ext)| stem + ext),
        // Paths, and things that look like them.
        2 => (
            prop::sample::select(vec![
                "../", "..\\", "/", "a/", "C:\\", "./", "\\\\server\\", "a/../", "\u{2215}",
                "\u{ff0f}", "%2e%2e%2f", "~/",
            ]),
            "[a-z]{1,8}",
            extension(),
        )
            .prop_map(|(prefix, stem, ext)| format!("{prefix}{stem}{ext}")),
        // Around the 255-byte limit, in 1- to 4-byte characters.
        1 => (
            prop::sample::select(vec!['a', 'é', '中', '😀']),
            240usize..=270,
            extension(),
        )
            .prop_map(|(c, bytes, ext)| {
                let mut stem = String::new();
                while stem.len() + c.len_utf8() + ext.len() <= bytes {
                    stem.push(c);
                }
                stem + ext
            }),
        // Leading or trailing whitespace, ASCII or not.
        1 => (
            prop::sample::select(vec![" ", "\t", "\u{a0}", "\u{3000}", "\u{200b}"]),
            "[a-z]{1,6}",
            any::<bool>(),
        )
            .prop_map(|(ws, stem, leading)| if leading {
                format!("{ws}{stem}.png")
            } else {
                format!("{stem}.png{ws}")
            }),
        1 => Just(String::new()),
    ]
}

/// Names that must be refused whatever else holds, checked independently of
/// `names::validate`.
fn plainly_invalid(name: &str) -> bool {
    name.is_empty()
        || name.len() > 255
        || name.contains(['/', '\\'])
        || name.contains("..")
        || name.chars().any(char::is_control)
        || name.trim() != name
}

#[test]
fn file_name_validation() {
    check("file_name_validation", file_name(), |name| {
        let verdict = names::validate(&name);
        if plainly_invalid(&name) {
            prop_assert!(verdict.is_err(), "accepted {name:?}");
        }
        let lower = name.to_lowercase();
        match verdict {
            Ok(Declared::Png) => prop_assert!(lower.ends_with(".png"), "{name:?}"),
            Ok(Declared::Jpeg) => prop_assert!(
                lower.ends_with(".jpg") || lower.ends_with(".jpeg"),
                "{name:?}"
            ),
            Err(msg) => prop_assert!(!msg.is_empty()),
        }
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------
// The upload path, end to end
// ---------------------------------------------------------------------------------------

/// What the upload carries.
#[derive(Debug, Clone)]
enum Body {
    /// A valid image file, maybe damaged.
    Image(ImageSpec, Damage),
    /// Noise, maybe behind the magic bytes of a format.
    Noise(Option<Codec>, Vec<u8>),
    /// No bytes (in zero or more empty chunks).
    Empty,
}

impl Body {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Body::Image(spec, damage) => damage.apply(spec.encode()),
            Body::Noise(codec, tail) => [codec.map(magic).unwrap_or_default(), &tail[..]].concat(),
            Body::Empty => Vec::new(),
        }
    }

    /// The undamaged image, if that is what the body is.
    fn intact(&self) -> Option<&ImageSpec> {
        match self {
            Body::Image(spec, Damage::None) => Some(spec),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
struct UploadCase {
    meta: UploadMeta,
    body: Body,
    /// Where the bytes are cut into chunks (repeats make empty chunks).
    cuts: Vec<Index>,
    /// Where the stream breaks with an error, if it does.
    abort: Option<Index>,
    /// If the upload is queued: wait for the task, then upload the same bytes again, with
    /// the same options (expecting the stored result) and with others (expecting a refusal
    /// to overwrite).
    again: bool,
}

fn model() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => Just(String::new()),
        4 => Just(CHEAP_MODEL.to_string()),
        2 => prop::sample::select(vec![
            // In the registry but not installed.
            "realesrgan-x2plus",
            "realesr-general-x4v3",
            // Near misses of an installed one.
            "REALESR-ANIMEVIDEOV3",
            " realesr-animevideov3",
            "realesr-animevideov3 ",
            "realesr-animevideov3\0",
            "realesr-animevideov3.safetensors",
            "../weights/realesr-animevideov3",
            "weights/realesr-animevideov3",
        ])
        .prop_map(String::from),
        1 => chars(24),
    ]
}

fn outscale() -> impl Strategy<Value = Option<f64>> {
    prop_oneof![
        3 => Just(None),
        3 => (0.5f64..=16.0).prop_map(Some),
        2 => prop::sample::select(vec![
            0.0,
            -0.0,
            -1.0,
            1.0,
            4.0,
            16.0,
            16.000_000_1,
            f64::NAN,
            -f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::MIN_POSITIVE,
            f64::EPSILON,
            f64::MAX,
            f64::MIN,
        ])
        .prop_map(Some),
        1 => any::<f64>().prop_map(Some),
    ]
}

fn tile() -> impl Strategy<Value = Option<u32>> {
    prop_oneof![
        3 => Just(None),
        1 => Just(Some(0)),
        2 => (2u32..=8).prop_map(|k| Some(8 * k)),
        1 => prop::sample::select(vec![1, 8, 15, 17, 20, u32::MAX, u32::MAX / 8 * 8]).prop_map(Some),
        1 => any::<u32>().prop_map(Some),
    ]
}

fn upload_meta() -> impl Strategy<Value = UploadMeta> {
    (
        file_name(),
        model(),
        outscale(),
        tile(),
        prop_oneof![Just(ResultFormat::Png), Just(ResultFormat::Jpeg)],
        any::<bool>(),
    )
        .prop_map(
            |(file_name, model, outscale, tile, format, overwrite)| UploadMeta {
                file_name,
                model,
                outscale,
                tile,
                format,
                overwrite,
            },
        )
}

fn body() -> impl Strategy<Value = Body> {
    prop_oneof![
        5 => (image_spec(40, vec![Codec::Png, Codec::Jpeg, Codec::WebP]), damage())
            .prop_map(|(spec, damage)| Body::Image(spec, damage)),
        // Mostly intact, so that most valid-looking cases get all the way through.
        4 => image_spec(40, vec![Codec::Png, Codec::Jpeg])
            .prop_map(|spec| Body::Image(spec, Damage::None)),
        2 => (
            prop::option::of(prop::sample::select(vec![Codec::Png, Codec::Jpeg, Codec::WebP])),
            prop::collection::vec(any::<u8>(), 0..1024),
        )
            .prop_map(|(codec, tail)| Body::Noise(codec, tail)),
        1 => Just(Body::Empty),
    ]
}

fn cuts() -> impl Strategy<Value = Vec<Index>> {
    prop::collection::vec(any::<Index>(), 0..6)
}

/// Anything at all: mostly refused, by the metadata or by the bytes.
fn arbitrary_case() -> impl Strategy<Value = UploadCase> {
    (
        upload_meta(),
        body(),
        cuts(),
        prop::option::weighted(0.15, any::<Index>()),
    )
        .prop_map(|(meta, body, cuts, abort)| UploadCase {
            meta,
            body,
            cuts,
            abort,
            again: false,
        })
}

/// Valid metadata and a name that matches the image, which is mostly intact: these get past
/// validation and through admission, so they meet the queue, name collisions (the stems
/// are few), earlier results and running tasks.
fn plausible_case() -> impl Strategy<Value = UploadCase> {
    let meta = (
        prop::sample::select(vec!["a", "b", "same", "été 1", "x.y"]),
        any::<bool>(),
        prop_oneof![Just(String::new()), Just(CHEAP_MODEL.to_string())],
        prop_oneof![Just(None), Just(Some(4.0)), (0.5f64..=16.0).prop_map(Some)],
        prop_oneof![
            3 => Just(None),
            1 => Just(Some(0)),
            1 => (2u32..=8).prop_map(|k| Some(8 * k))
        ],
        prop_oneof![3 => Just(ResultFormat::Png), 1 => Just(ResultFormat::Jpeg)],
        any::<bool>(),
    );
    let image = (
        image_spec(40, vec![Codec::Png, Codec::Jpeg]),
        prop_oneof![3 => Just(Damage::None), 1 => damage()],
    );
    (
        meta,
        image,
        cuts(),
        prop::option::weighted(0.05, any::<Index>()),
        prop::bool::weighted(0.2),
    )
        .prop_map(
            |(
                (stem, upper, model, outscale, tile, format, overwrite),
                (spec, damage),
                cuts,
                abort,
                again,
            )| {
                let ext = match (spec.codec, upper) {
                    (Codec::Png, false) => "png",
                    (Codec::Png, true) => "PNG",
                    (_, false) => "jpg",
                    (_, true) => "jpeg",
                };
                UploadCase {
                    meta: UploadMeta {
                        file_name: format!("{stem}.{ext}"),
                        model,
                        outscale,
                        tile,
                        format,
                        overwrite,
                    },
                    body: Body::Image(spec, damage),
                    cuts,
                    abort,
                    again,
                }
            },
        )
}

fn upload_case() -> impl Strategy<Value = UploadCase> {
    prop_oneof![arbitrary_case(), plausible_case()]
}

/// Cuts `bytes` at the given points; an empty body gives one empty chunk per cut.
fn split(bytes: &[u8], cuts: &[Index]) -> Vec<Vec<u8>> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len() + 1)).collect();
    points.sort_unstable();
    if bytes.is_empty() {
        return points.iter().map(|_| Vec::new()).collect();
    }
    let mut chunks = Vec::new();
    let mut start = 0;
    for p in points {
        chunks.push(bytes[start..p].to_vec());
        start = p;
    }
    chunks.push(bytes[start..].to_vec());
    chunks
}

/// Whether `meta.outscale` leaves a `width` x `height` image without a pixel on a side
/// (the service's rule, restated: truncation, as Real-ESRGAN's `int(w * outscale)`, unless
/// the outscale is the model's own scale).
fn empties_output(meta: &UploadMeta, width: u32, height: u32) -> bool {
    let model = if meta.model.is_empty() {
        CHEAP_MODEL
    } else {
        &meta.model
    };
    let (Some(s), Ok(spec)) = (meta.outscale, upscaler::model::find(model)) else {
        return false;
    };
    s != spec.scale() as f64 && ((width as f64 * s) as u32 == 0 || (height as f64 * s) as u32 == 0)
}

/// One service on the embedded backends, for a whole run of a property.
struct Fixture {
    rt: tokio::runtime::Runtime,
    service: TaskService,
    temp_dir: PathBuf,
    weights_dir: PathBuf,
    /// Tasks the property saw queued: at the end they must all finish.
    queued: Mutex<Vec<(String, String)>>,
    /// How often each outcome was seen, to show what a run exercised.
    outcomes: Mutex<BTreeMap<String, usize>>,
    _root: tempfile::TempDir,
}

impl Fixture {
    fn start() -> Self {
        let root = tempfile::tempdir().unwrap();
        let weights_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("weights");
        let mut settings = Settings::for_dirs(
            root.path().join("data"),
            root.path().join("tmp"),
            weights_dir.clone(),
        );
        settings.default_model = CHEAP_MODEL.into();
        settings.workers = 1;
        // Small, so that a burst of accepted uploads also meets a full queue.
        settings.queue_capacity = 8;
        settings.max_pixels = SERVICE_MAX_PIXELS;
        settings.max_upload_bytes = SERVICE_MAX_UPLOAD_BYTES;
        settings.validate().unwrap();
        let temp_dir = upscaler::tasks::work_dir(&settings, None);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let store = Arc::new(EmbeddedStore::open(&settings.data_dir).unwrap());
        let service = rt
            .block_on(TaskService::start(
                settings,
                store.clone(),
                store,
                Arc::new(MemoryLocks::new()),
            ))
            .unwrap();
        Self {
            rt,
            service,
            temp_dir,
            weights_dir,
            queued: Mutex::default(),
            outcomes: Mutex::default(),
            _root: root,
        }
    }

    /// Names in the temp dir ending in `suffix`.
    fn temp_files(&self, suffix: &str) -> BTreeSet<String> {
        std::fs::read_dir(&self.temp_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(suffix))
            .collect()
    }

    /// Whether the metadata alone is acceptable: the service's rules, restated.
    fn meta_is_valid(&self, meta: &UploadMeta) -> bool {
        let model = if meta.model.is_empty() {
            CHEAP_MODEL
        } else {
            &meta.model
        };
        let installed = upscaler::model::find(model)
            .is_ok_and(|spec| self.weights_dir.join(spec.weights_file_name()).is_file());
        names::validate(&meta.file_name).is_ok()
            && installed
            && meta
                .outscale
                .is_none_or(|s| s.is_finite() && s > 0.0 && s <= 16.0)
            && meta.tile.is_none_or(|t| t == 0 || (t >= 16 && t % 8 == 0))
    }

    fn check_upload(&self, case: UploadCase) -> Result<(), TestCaseError> {
        let meta = &case.meta;
        let body = case.body.bytes();
        let mut items: Vec<Result<Vec<u8>, Error>> =
            split(&body, &case.cuts).into_iter().map(Ok).collect();
        let aborted = case.abort.is_some();
        if let Some(at) = case.abort {
            let at = at.index(items.len() + 1);
            items.insert(at, Err(Error::Aborted("the client went away".into())));
        }
        let meta_ok = self.meta_is_valid(meta);
        if plainly_invalid(&meta.file_name) {
            prop_assert!(!meta_ok, "the service rules accept {:?}", meta.file_name);
        }
        // An undamaged image the service must take, unless the stream breaks.
        let acceptable = case.body.intact().filter(|spec| {
            let declared = names::validate(&meta.file_name).ok();
            let format_ok = matches!(
                (declared, spec.codec),
                (Some(Declared::Png), Codec::Png) | (Some(Declared::Jpeg), Codec::Jpeg)
            );
            format_ok
                && spec.pixel_count() <= SERVICE_MAX_PIXELS
                && body.len() as u64 <= SERVICE_MAX_UPLOAD_BYTES
                && !(spec.has_alpha() && meta.format == ResultFormat::Jpeg)
                && !empties_output(meta, spec.width, spec.height)
        });

        let locks = self.service.locks();
        self.rt.block_on(async {
            let holder_before = locks.holder(&meta.file_name).await.unwrap();
            let sources_before = self.temp_files(".src");
            let upload = self
                .service
                .upload(meta.clone(), futures::stream::iter(items).boxed());
            let Ok(result) = tokio::time::timeout(UPLOAD_TIME_LIMIT, upload).await else {
                return Err(TestCaseError::fail("the upload hung"));
            };

            let label = match &result {
                Ok(o) => format!("{:?}", o.kind),
                Err(e) => format!("{e:?}").split('(').next().unwrap_or_default().to_string(),
            };
            *self.outcomes.lock().unwrap().entry(label).or_default() += 1;

            // Only the kinds a client can act on.
            match &result {
                Err(Error::InvalidArgument(_))
                | Err(Error::TooLarge(_))
                | Err(Error::AlreadyExists(_))
                | Err(Error::QueueFull(_)) => {}
                Err(Error::Aborted(_)) => prop_assert!(aborted, "{result:?}"),
                Err(e) => {
                    return Err(TestCaseError::fail(format!("unexpected error kind: {e:?}")))
                }
                Ok(outcome) => {
                    prop_assert_eq!(&outcome.file_name, &meta.file_name);
                    prop_assert!(!outcome.task_id.is_empty());
                }
            }
            let kind = result.as_ref().map(|o| o.kind);
            let in_progress = matches!(kind, Ok(OutcomeKind::InProgress));
            if !meta_ok {
                prop_assert!(
                    matches!(result, Err(Error::InvalidArgument(_))),
                    "invalid metadata gave {result:?}"
                );
            } else if aborted {
                // Either refused before the bytes (the name is busy) or stopped by the break.
                prop_assert!(in_progress || result.is_err(), "{result:?}");
                if acceptable.is_some() {
                    prop_assert!(
                        in_progress || matches!(result, Err(Error::Aborted(_))),
                        "{result:?}"
                    );
                }
            } else if body.is_empty() {
                prop_assert!(
                    in_progress || matches!(result, Err(Error::InvalidArgument(_))),
                    "{result:?}"
                );
            } else if acceptable.is_some() {
                prop_assert!(
                    matches!(
                        result,
                        Ok(_) | Err(Error::AlreadyExists(_)) | Err(Error::QueueFull(_))
                    ),
                    "a valid upload was refused: {result:?}"
                );
            } else if case.body.intact().is_some() {
                // Valid image, but wrong for the name, the limits or the output format.
                prop_assert!(
                    in_progress
                        || matches!(
                            result,
                            Err(Error::InvalidArgument(_)) | Err(Error::TooLarge(_))
                        ),
                    "{result:?}"
                );
            }

            // Nothing left behind.
            let parts = self.temp_files(".part");
            prop_assert!(parts.is_empty(), "temp files left: {parts:?}");
            match &result {
                Err(_) => {
                    let sources = self.temp_files(".src");
                    prop_assert!(
                        sources.is_subset(&sources_before),
                        "a refused upload left a source: before {sources_before:?}, after {sources:?}"
                    );
                    let holder = locks.holder(&meta.file_name).await.unwrap();
                    if holder_before.is_none() {
                        prop_assert_eq!(holder, None, "a refused upload kept the name locked");
                    }
                }
                Ok(outcome) if outcome.kind == OutcomeKind::Queued => {
                    let task = self.service.get(&outcome.task_id).await;
                    let Ok(task) = task else {
                        return Err(TestCaseError::fail(format!("queued task: {task:?}")));
                    };
                    prop_assert_eq!(&task.file_name, &meta.file_name);
                    prop_assert_eq!(&task.source_sha256, &hex(&Sha256::digest(&body)));
                    if let Some(spec) = case.body.intact() {
                        prop_assert_eq!(
                            (task.input_width, task.input_height),
                            (spec.width, spec.height)
                        );
                    }
                    self.queued
                        .lock()
                        .unwrap()
                        .push((outcome.task_id.clone(), meta.file_name.clone()));
                    if case.again {
                        self.upload_again(meta, &body, &outcome.task_id).await?;
                    }
                }
                Ok(outcome) if outcome.kind == OutcomeKind::AlreadyProcessed => {
                    let stored = self.service.fetch(&meta.file_name).await;
                    let Ok((stored, _)) = stored else {
                        return Err(TestCaseError::fail("already processed, but no result"));
                    };
                    prop_assert_eq!(&stored.task_id, &outcome.task_id);
                }
                Ok(outcome) => {
                    // In progress: the task that holds (or held) the name exists.
                    let task = self.service.get(&outcome.task_id).await;
                    let Ok(task) = task else {
                        return Err(TestCaseError::fail(format!("busy with {task:?}")));
                    };
                    prop_assert_eq!(&task.file_name, &meta.file_name);
                }
            }
            Ok(())
        })
    }

    /// After `task_id` (an upload of `body` with `meta`) succeeds, the same upload is answered
    /// from the stored result, and one with other options is refused unless it may
    /// overwrite.
    async fn upload_again(
        &self,
        meta: &UploadMeta,
        body: &[u8],
        task_id: &str,
    ) -> Result<(), TestCaseError> {
        let task = self.wait_finished(task_id).await;
        if task.state != TaskState::Success {
            return Ok(());
        }
        let once = |meta: UploadMeta| {
            let chunks = futures::stream::iter([Ok(body.to_vec())]).boxed();
            tokio::time::timeout(UPLOAD_TIME_LIMIT, self.service.upload(meta, chunks))
        };
        let Ok(same) = once(meta.clone()).await else {
            return Err(TestCaseError::fail("the repeated upload hung"));
        };
        *self
            .outcomes
            .lock()
            .unwrap()
            .entry("AlreadyProcessed (repeat)".into())
            .or_default() += same.is_ok() as usize;
        match &same {
            Ok(o) => {
                prop_assert_eq!(o.kind, OutcomeKind::AlreadyProcessed);
                prop_assert_eq!(&o.task_id, task_id);
            }
            Err(e) => return Err(TestCaseError::fail(format!("the same upload again: {e:?}"))),
        }
        let other = UploadMeta {
            outscale: match meta.outscale {
                Some(_) => None,
                None => Some(2.0),
            },
            overwrite: false,
            ..meta.clone()
        };
        let Ok(other) = once(other).await else {
            return Err(TestCaseError::fail("the repeated upload hung"));
        };
        prop_assert!(
            matches!(other, Err(Error::AlreadyExists(_))),
            "other options, no overwrite: {other:?}"
        );
        prop_assert!(self.temp_files(".part").is_empty());
        Ok(())
    }

    /// Waits until the task is finished and has let go of its file name (the final state
    /// is published just before the lock is released).
    async fn wait_finished(&self, task_id: &str) -> TaskRecord {
        let deadline = Instant::now() + DRAIN_TIME_LIMIT;
        let locks = self.service.locks();
        loop {
            let task = self.service.get(task_id).await.unwrap();
            if task.state.is_terminal()
                && locks.holder(&task.file_name).await.unwrap().as_deref() != Some(task_id)
            {
                return task;
            }
            assert!(
                Instant::now() < deadline,
                "task {task_id} never finished: {task:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits for every queued task to finish, then checks that none panicked and that no
    /// file or lock is left. Returns (succeeded, failed) with the distinct failure messages.
    fn drain(self) -> (usize, Vec<String>) {
        let queued = std::mem::take(&mut *self.queued.lock().unwrap());
        let (succeeded, failures) = self.rt.block_on(async {
            let mut succeeded = 0;
            let mut failures = BTreeSet::new();
            for (id, _) in &queued {
                let task = self.wait_finished(id).await;
                match task.state {
                    TaskState::Success => succeeded += 1,
                    _ => {
                        failures.insert(task.error.unwrap_or_default());
                    }
                }
            }
            let locks = self.service.locks();
            for (id, name) in &queued {
                assert_eq!(
                    locks.holder(name).await.unwrap(),
                    None,
                    "the name of finished task {id} is still locked"
                );
            }
            self.service.shutdown().await;
            (succeeded, failures)
        });
        let left = self.temp_files("");
        assert!(left.is_empty(), "temp files left after the run: {left:?}");
        assert!(
            failures.is_empty(),
            "accepted uploads failed in the worker: {failures:?}"
        );
        (succeeded, failures.into_iter().collect())
    }
}

#[test]
fn upload_path() {
    let fixture = Fixture::start();
    check("upload_path", upload_case(), |case| {
        fixture.check_upload(case)
    });
    let queued = fixture.queued.lock().unwrap().len();
    let outcomes = fixture.outcomes.lock().unwrap().clone();
    let (succeeded, failures) = fixture.drain();
    eprintln!("upload_fuzz: upload_path: outcomes {outcomes:?}");
    eprintln!(
        "upload_fuzz: upload_path: {queued} uploads queued, {succeeded} succeeded, {} failed",
        queued - succeeded
    );
    for msg in failures.iter().take(5) {
        eprintln!("upload_fuzz: upload_path: task failure: {msg}");
    }
    if failures.len() > 5 {
        eprintln!(
            "upload_fuzz: upload_path: ... and {} more failure messages",
            failures.len() - 5
        );
    }
}

// ---------------------------------------------------------------------------------------
// Regressions: minimal inputs of bugs the properties found, as plain tests.
// ---------------------------------------------------------------------------------------
//
// Each was found by a property above and fixed; the test keeps it fixed.

/// A well-formed PNG header whose one row would take more than 512 MiB decoded (here
/// 178956971 x 1 RGB8: 3 bytes a pixel, one byte over 512 MiB; the shrunk input of
/// `image_functions_on_forged_headers`) was reported by `imaging::probe` as
/// `Decode("Memory limit exceeded")`, not `TooLarge`: the PNG decoder refused to read such
/// a header under the image crate's default memory limit. `probe` now reads headers
/// without it (the pixel limit is checked right after).
#[test]
fn regression_probe_png_with_huge_row_is_too_large() {
    let bytes = forged_png(178_956_971, 1, 8, 2, &[0]);
    let probed = imaging::probe(&bytes, imaging::DEFAULT_MAX_PIXELS);
    assert!(
        matches!(
            probed,
            Err(ImagingError::TooLarge {
                width: 178_956_971,
                height: 1,
                ..
            })
        ),
        "{probed:?}"
    );
}

/// The same bug seen by a client: the upload was refused as INVALID_ARGUMENT "cannot
/// decode image: Memory limit exceeded" instead of RESOURCE_EXHAUSTED with the image's
/// size, and only at the end of the stream. It is now TooLarge from the header, before the
/// rest of the bytes (a second chunk that would break the stream is never read).
#[test]
fn regression_upload_png_with_huge_row_is_too_large() {
    let fixture = Fixture::start();
    let meta = UploadMeta {
        file_name: "wide.png".into(),
        model: String::new(),
        outscale: None,
        tile: None,
        format: ResultFormat::Png,
        overwrite: false,
    };
    let bytes = forged_png(178_956_971, 1, 8, 2, &[0]);
    let chunks = [
        Ok(bytes),
        Err(Error::Aborted("read past the header".into())),
    ];
    let result = fixture.rt.block_on(
        fixture
            .service
            .upload(meta, futures::stream::iter(chunks).boxed()),
    );
    assert!(
        matches!(&result, Err(Error::TooLarge(m)) if m.contains("178956971x1")),
        "{result:?}"
    );
    fixture.drain();
}

/// An outscale that makes the output empty was accepted: a 1 x 1 PNG with outscale 0.5 was
/// QUEUED, and the task then ended in FAILURE with "outscale 0.5 makes a 1x1 image empty".
/// Seen in `upload_path` with tiny outscales (f64::MIN_POSITIVE) and with ordinary ones on
/// one-pixel-high images (0.63 on 32 x 1). `admit` now checks the output size, once the
/// dimensions are known, and refuses with nothing left behind.
#[test]
fn regression_upload_refuses_outscale_that_empties_the_image() {
    let fixture = Fixture::start();
    let spec = ImageSpec {
        codec: Codec::Png,
        pixels: Pixels::Rgb8,
        width: 1,
        height: 1,
        seed: 0,
        noisy: false,
    };
    let meta = UploadMeta {
        file_name: "dot.png".into(),
        model: String::new(),
        outscale: Some(0.5),
        tile: None,
        format: ResultFormat::Png,
        overwrite: false,
    };
    let result = fixture.rt.block_on(
        fixture
            .service
            .upload(meta, futures::stream::iter([Ok(spec.encode())]).boxed()),
    );
    if let Ok(outcome) = &result {
        let task = fixture.rt.block_on(fixture.wait_finished(&outcome.task_id));
        fixture.drain();
        panic!(
            "queued, and the task ended {:?}: {:?}",
            task.state, task.error
        );
    }
    assert!(
        matches!(result, Err(Error::InvalidArgument(_))),
        "{result:?}"
    );
    fixture.drain();
}

/// The same refusal must not depend on what is stored under the name: with a result for
/// `Same.PNG` made from other bytes, a 1 x 1 PNG with outscale 2.2e-308 (`upload_path`'s
/// shrunk input) was answered ALREADY_EXISTS, because the stored result was looked up
/// before the output size was checked. The image's own faults come first now.
#[test]
fn regression_upload_refuses_an_empty_output_before_looking_at_the_name() {
    let fixture = Fixture::start();
    let upload = |bytes: Vec<u8>, outscale| {
        let meta = UploadMeta {
            file_name: "Same.PNG".into(),
            model: String::new(),
            outscale,
            tile: None,
            format: ResultFormat::Png,
            overwrite: false,
        };
        fixture.rt.block_on(
            fixture
                .service
                .upload(meta, futures::stream::iter([Ok(bytes)]).boxed()),
        )
    };
    let spec = |pixels, seed| ImageSpec {
        codec: Codec::Png,
        pixels,
        width: 1,
        height: 1,
        seed,
        noisy: false,
    };
    let first = upload(spec(Pixels::Rgb8, 1).encode(), None).expect("queued");
    let task = fixture.rt.block_on(fixture.wait_finished(&first.task_id));
    assert_eq!(task.state, TaskState::Success, "{:?}", task.error);
    let result = upload(
        spec(Pixels::Gray8, 0).encode(),
        Some(2.2250738585072014e-308),
    );
    assert!(
        matches!(&result, Err(Error::InvalidArgument(m)) if m.contains("empty")),
        "{result:?}"
    );
    fixture.drain();
}
