//! Working memory for forward passes on the fast path, kept between passes.
//!
//! A pass of a 512x512 tile touches gigabytes of activations. Allocated afresh, each buffer
//! is mapped, page-faulted and zeroed by the kernel on every pass, which cost as much time
//! in the kernel as in the network. Instead each network keeps a pool of [`Arena`]s: a pass
//! takes one, sizes its numbered slots for the tile (growing only when a larger tile than
//! any before arrives), and gives it back. In the steady state a pass allocates nothing and
//! fills nothing it is about to overwrite.
//!
//! The pool holds one arena per pass that ran at the same time (one per worker), so the
//! memory a worker used at its largest tile stays with the process until the model is
//! dropped; `upscaler bench` and the `--tile` budget show how much that is.

use std::sync::{Arc, Mutex};

use rayon::prelude::*;

/// Numbered buffers of f32 for one pass at a time.
#[derive(Debug, Default)]
pub struct Arena {
    slots: Vec<Vec<f32>>,
}

impl Arena {
    /// Slot `i` with room for at least `len` values. Its contents are whatever an earlier
    /// pass left (zeros when it was just grown). Growing drops the old buffer first, so a
    /// slot never holds two sizes at once.
    pub fn slot(&mut self, i: usize, len: usize) -> &mut [f32] {
        if self.slots.len() <= i {
            self.slots.resize_with(i + 1, Vec::new);
        }
        let buf = &mut self.slots[i];
        if buf.len() < len {
            *buf = Vec::new();
            *buf = vec![0.0; len];
            populate(buf);
        }
        &mut buf[..len]
    }

    /// Slots `0..N`, with room for `lens[i]` values each, as separate slices.
    pub fn slots<const N: usize>(&mut self, lens: [usize; N]) -> [&mut [f32]; N] {
        for (i, &len) in lens.iter().enumerate() {
            self.slot(i, len);
        }
        let mut bufs = self
            .slots
            .iter_mut()
            .zip(lens)
            .map(|(b, len)| &mut b[..len]);
        std::array::from_fn(|_| bufs.next().expect("every slot was sized above"))
    }

    /// Bytes held by all slots.
    pub fn bytes(&self) -> usize {
        self.slots.iter().map(|s| s.len() * 4).sum()
    }
}

/// Faults a freshly allocated buffer in with one call per piece (`MADV_POPULATE_WRITE`,
/// Linux 5.14+), the pieces spread over the thread pool, instead of one page fault per 4 KiB
/// page as it is first written. That costs less kernel time where faults are expensive
/// (virtual machines), and the kernel's part of a large allocation no longer runs on one
/// core. Advice only: an older kernel refuses it and the pages fault in as they are touched.
pub(crate) fn populate(buf: &mut [f32]) {
    /// 4 MiB pieces: few calls, and enough of them to share out.
    const PIECE: usize = 1 << 20;
    buf.par_chunks_mut(PIECE).for_each(populate_piece);
}

fn populate_piece(buf: &mut [f32]) {
    #[cfg(target_os = "linux")]
    {
        const PAGE: usize = 4096;
        let start = buf.as_mut_ptr() as usize;
        let end = start + std::mem::size_of_val(buf);
        let (from, to) = (start.next_multiple_of(PAGE), end / PAGE * PAGE);
        if to > from {
            // SAFETY: the range lies inside `buf`'s allocation; the advice changes no
            // contents (the pages are untouched zeros either way).
            unsafe {
                libc::madvise(
                    from as *mut libc::c_void,
                    to - from,
                    libc::MADV_POPULATE_WRITE,
                )
            };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = buf;
}

/// Arenas not in use, shared by every clone of a network.
#[derive(Debug, Clone, Default)]
pub struct ArenaPool {
    free: Arc<Mutex<Vec<Arena>>>,
}

impl ArenaPool {
    /// Runs `f` with an arena of its own: a free one, or a new one if every arena is in use.
    pub fn with<R>(&self, f: impl FnOnce(&mut Arena) -> R) -> R {
        let taken = self.lock().pop();
        let mut arena = taken.unwrap_or_default();
        let out = f(&mut arena);
        self.lock().push(arena);
        out
    }

    /// Bytes held by the arenas not in use.
    pub fn idle_bytes(&self) -> usize {
        self.lock().iter().map(Arena::bytes).sum()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arena>> {
        // A pass that panicked holds no arena of the pool; the list itself stays valid.
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_keep_their_memory_and_grow_only_when_needed() {
        let mut a = Arena::default();
        a.slot(1, 8)[3] = 7.0;
        let p = a.slot(1, 8).as_ptr();
        assert_eq!(
            a.slot(1, 4).as_ptr(),
            p,
            "a smaller request reuses the buffer"
        );
        assert_eq!(a.slot(1, 8)[3], 7.0, "contents are kept, not refilled");
        assert_eq!(a.slot(1, 16).len(), 16);
        assert_eq!(a.bytes(), 16 * 4);
        let [x, y] = a.slots([2, 16]);
        x[0] = 1.0;
        y[15] = 2.0;
        assert_eq!((a.slot(0, 2)[0], a.slot(1, 16)[15]), (1.0, 2.0));
    }

    #[test]
    fn a_pool_hands_out_separate_arenas_and_keeps_them() {
        let pool = ArenaPool::default();
        pool.with(|a| {
            a.slot(0, 10);
            pool.with(|b| {
                b.slot(0, 20);
            });
        });
        assert_eq!(pool.idle_bytes(), 30 * 4);
        pool.with(|a| assert!(a.bytes() > 0, "an arena is reused"));
    }
}
