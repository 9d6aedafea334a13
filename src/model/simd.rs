//! The instruction sets the fast convolution is compiled for, and a small vector trait the
//! kernels are written against, so one generic body becomes an AVX-512, an AVX2+FMA and a
//! baseline (SSE2) copy.
//!
//! The copy a pass uses is chosen once per process ([`Isa::active`]): the widest the CPU
//! has, or the one named by `UPSCALER_ISA` (`avx512`, `avx2`, `baseline`), which lets an
//! AVX-512 machine measure and test the AVX2 path. Tests can run any available copy through
//! the explicit `*_isa` entry points.

use std::sync::OnceLock;

/// An instruction-set path of the fast convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Isa {
    /// SSE2, which every x86-64 has, or plain code elsewhere.
    Baseline,
    /// AVX2 with FMA: 8 lanes, 16 vector registers.
    Avx2,
    /// AVX-512F with FMA: 16 lanes, 32 vector registers.
    Avx512,
}

impl Isa {
    pub const ALL: [Isa; 3] = [Isa::Avx512, Isa::Avx2, Isa::Baseline];

    pub fn name(self) -> &'static str {
        match self {
            Isa::Baseline => "baseline",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|i| i.name().eq_ignore_ascii_case(s.trim()))
    }

    /// Whether this CPU can run the path.
    pub fn supported(self) -> bool {
        match self {
            Isa::Baseline => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The paths this CPU can run, widest first.
    pub fn available() -> Vec<Isa> {
        Self::ALL.into_iter().filter(|i| i.supported()).collect()
    }

    /// The widest path this CPU runs.
    pub fn detect() -> Self {
        Self::available()[0]
    }

    /// The path forward passes use: `UPSCALER_ISA` if set (and supported), else the widest.
    /// Decided once per process; an unusable `UPSCALER_ISA` is logged and ignored.
    pub fn active() -> Self {
        static ACTIVE: OnceLock<Isa> = OnceLock::new();
        *ACTIVE.get_or_init(|| {
            let Ok(wanted) = std::env::var("UPSCALER_ISA") else {
                return Self::detect();
            };
            match Self::parse(&wanted) {
                Some(isa) if isa.supported() => isa,
                Some(isa) => {
                    tracing::warn!(
                        requested = isa.name(),
                        using = Self::detect().name(),
                        "UPSCALER_ISA names a path this CPU lacks; ignoring it"
                    );
                    Self::detect()
                }
                None => {
                    tracing::warn!(
                        value = %wanted,
                        using = Self::detect().name(),
                        "UPSCALER_ISA is not one of avx512, avx2, baseline; ignoring it"
                    );
                    Self::detect()
                }
            }
        })
    }

    /// Rows of the GEMM microkernel on this path (see `fastconv`).
    pub(crate) fn gemm_rows(self) -> usize {
        match self {
            Isa::Baseline => Sse::MR,
            Isa::Avx2 => Avx2::MR,
            Isa::Avx512 => Avx512::MR,
        }
    }
}

/// A vector of `LANES` f32 and the few operations the kernels need. Every method is
/// `#[inline(always)]` and is only ever inlined into a function compiled for the ISA (see
/// `fastconv`), where the intrinsics become single instructions.
pub(crate) trait Simd: Copy {
    type V: Copy;
    const LANES: usize;
    /// Rows and vectors per row of the GEMM microkernel: `MR * NV` accumulators.
    const MR: usize;
    const NV: usize;

    unsafe fn zero() -> Self::V;
    unsafe fn splat(x: f32) -> Self::V;
    unsafe fn load(p: *const f32) -> Self::V;
    unsafe fn store(p: *mut f32, v: Self::V);
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn sub(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V;
    /// `a * b + c`, fused where the ISA has FMA.
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn min(a: Self::V, b: Self::V) -> Self::V;
}

/// The baseline: four lanes in plain arrays, which SSE2 code generation turns into one
/// register per vector. No FMA, so `fma` rounds twice.
#[derive(Clone, Copy)]
pub(crate) struct Sse;

impl Simd for Sse {
    type V = [f32; 4];
    const LANES: usize = 4;
    const MR: usize = 3;
    const NV: usize = 4;

    #[inline(always)]
    unsafe fn zero() -> Self::V {
        [0.0; 4]
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self::V {
        [x; 4]
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self::V {
        p.cast::<[f32; 4]>().read_unaligned()
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: Self::V) {
        p.cast::<[f32; 4]>().write_unaligned(v)
    }
    #[inline(always)]
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V {
        std::array::from_fn(|i| a[i] + b[i])
    }
    #[inline(always)]
    unsafe fn sub(a: Self::V, b: Self::V) -> Self::V {
        std::array::from_fn(|i| a[i] - b[i])
    }
    #[inline(always)]
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V {
        std::array::from_fn(|i| a[i] * b[i])
    }
    #[inline(always)]
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V {
        std::array::from_fn(|i| a[i] * b[i] + c[i])
    }
    #[inline(always)]
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V {
        std::array::from_fn(|i| if a[i] > b[i] { a[i] } else { b[i] })
    }
    #[inline(always)]
    unsafe fn min(a: Self::V, b: Self::V) -> Self::V {
        std::array::from_fn(|i| if a[i] < b[i] { a[i] } else { b[i] })
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{Avx2, Avx512};

/// Placeholders off x86-64, never selected (`Isa::supported` is false there).
#[cfg(not(target_arch = "x86_64"))]
pub(crate) type Avx2 = Sse;
#[cfg(not(target_arch = "x86_64"))]
pub(crate) type Avx512 = Sse;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Simd;
    use std::arch::x86_64::*;

    /// AVX2 + FMA: 8 lanes. The microkernel keeps 6 rows x 2 vectors (a 6x16 block) in 12
    /// of the 16 registers, with 2 for the weights and 1 for the broadcast input.
    #[derive(Clone, Copy)]
    pub(crate) struct Avx2;

    impl Simd for Avx2 {
        type V = __m256;
        const LANES: usize = 8;
        const MR: usize = 6;
        const NV: usize = 2;

        #[inline(always)]
        unsafe fn zero() -> Self::V {
            _mm256_setzero_ps()
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> Self::V {
            _mm256_set1_ps(x)
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self::V {
            _mm256_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: Self::V) {
            _mm256_storeu_ps(p, v)
        }
        #[inline(always)]
        unsafe fn add(a: Self::V, b: Self::V) -> Self::V {
            _mm256_add_ps(a, b)
        }
        #[inline(always)]
        unsafe fn sub(a: Self::V, b: Self::V) -> Self::V {
            _mm256_sub_ps(a, b)
        }
        #[inline(always)]
        unsafe fn mul(a: Self::V, b: Self::V) -> Self::V {
            _mm256_mul_ps(a, b)
        }
        #[inline(always)]
        unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V {
            _mm256_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn max(a: Self::V, b: Self::V) -> Self::V {
            _mm256_max_ps(a, b)
        }
        #[inline(always)]
        unsafe fn min(a: Self::V, b: Self::V) -> Self::V {
            _mm256_min_ps(a, b)
        }
    }

    /// AVX-512F: 16 lanes. The microkernel keeps 8 rows x 2 vectors (an 8x32 block) in 16 of
    /// the 32 registers.
    #[derive(Clone, Copy)]
    pub(crate) struct Avx512;

    impl Simd for Avx512 {
        type V = __m512;
        const LANES: usize = 16;
        const MR: usize = 8;
        const NV: usize = 2;

        #[inline(always)]
        unsafe fn zero() -> Self::V {
            _mm512_setzero_ps()
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> Self::V {
            _mm512_set1_ps(x)
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self::V {
            _mm512_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: Self::V) {
            _mm512_storeu_ps(p, v)
        }
        #[inline(always)]
        unsafe fn add(a: Self::V, b: Self::V) -> Self::V {
            _mm512_add_ps(a, b)
        }
        #[inline(always)]
        unsafe fn sub(a: Self::V, b: Self::V) -> Self::V {
            _mm512_sub_ps(a, b)
        }
        #[inline(always)]
        unsafe fn mul(a: Self::V, b: Self::V) -> Self::V {
            _mm512_mul_ps(a, b)
        }
        #[inline(always)]
        unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V {
            _mm512_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn max(a: Self::V, b: Self::V) -> Self::V {
            _mm512_max_ps(a, b)
        }
        #[inline(always)]
        unsafe fn min(a: Self::V, b: Self::V) -> Self::V {
            _mm512_min_ps(a, b)
        }
    }
}

/// One lane: the same formulas as the vector kernels, for channel counts that are not a
/// multiple of the vector width (the 3-channel first and last convolutions).
#[derive(Clone, Copy)]
pub(crate) struct Scalar;

impl Simd for Scalar {
    type V = f32;
    const LANES: usize = 1;
    const MR: usize = 1;
    const NV: usize = 1;

    #[inline(always)]
    unsafe fn zero() -> f32 {
        0.0
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> f32 {
        x
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> f32 {
        *p
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: f32) {
        *p = v
    }
    #[inline(always)]
    unsafe fn add(a: f32, b: f32) -> f32 {
        a + b
    }
    #[inline(always)]
    unsafe fn sub(a: f32, b: f32) -> f32 {
        a - b
    }
    #[inline(always)]
    unsafe fn mul(a: f32, b: f32) -> f32 {
        a * b
    }
    #[inline(always)]
    unsafe fn fma(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
    #[inline(always)]
    unsafe fn max(a: f32, b: f32) -> f32 {
        if a > b {
            a
        } else {
            b
        }
    }
    #[inline(always)]
    unsafe fn min(a: f32, b: f32) -> f32 {
        if a < b {
            a
        } else {
            b
        }
    }
}
