//! The global allocator of the `arkgate` binary and the bare forwarder: mimalloc, asked the way
//! its plain `malloc` serves.
//!
//! Every Rust allocation carries an alignment. The `mimalloc` crate hands each one to
//! `mi_malloc_aligned`, whose fast path covers blocks up to 1 KiB only: larger ones (Pingora's
//! 4 KiB header buffers, 64 KiB body buffers, each request's boxed future) take a generic path
//! that over-allocates by the alignment, which also pushes a block into the next size class.
//! mimalloc's size classes are multiples of 8 bytes (of 16 above 16) and each page's first block
//! is 16-byte aligned, so a request whose size is a multiple of an alignment of at most 16
//! bytes, as every Rust type's is, is already aligned by plain `mi_malloc`; only larger
//! alignments go to the aligned functions.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// The largest alignment every fitting mimalloc block has (`MI_MAX_ALIGN_SIZE`).
const NATURAL_ALIGN: usize = 16;

/// mimalloc as the global allocator.
pub struct MiMalloc;

/// True when plain `mi_malloc(size)` returns a block aligned to `align`.
#[inline]
fn natural(size: usize, align: usize) -> bool {
    align <= NATURAL_ALIGN && size.is_multiple_of(align)
}

/// A block for `layout` from `plain(size)` where its blocks are aligned enough (see `natural`),
/// else from `aligned(size, align)`.
///
/// # Safety
/// `plain` and `aligned` are a mimalloc allocation pair (`mi_malloc`/`mi_malloc_aligned` or
/// `mi_zalloc`/`mi_zalloc_aligned`); `layout` has a non-zero size (the `GlobalAlloc` contract).
#[allow(unsafe_code)]
#[inline]
unsafe fn allocate(
    layout: Layout,
    plain: unsafe extern "C" fn(usize) -> *mut c_void,
    aligned: unsafe extern "C" fn(usize, usize) -> *mut c_void,
) -> *mut u8 {
    let (size, align) = (layout.size(), layout.align());
    // SAFETY: a size and a power-of-two alignment from a valid `Layout`, as both functions need.
    let block = unsafe {
        if natural(size, align) {
            plain(size)
        } else {
            aligned(size, align)
        }
    };
    block.cast()
}

// SAFETY: each method forwards to the mimalloc function with the same contract (a block of at
// least `size` bytes aligned to `layout.align()`, or null), choosing the unaligned one only where
// its blocks are known to satisfy the alignment (see `natural`); `dealloc` and `realloc` receive
// pointers that these methods returned.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for MiMalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: mimalloc's allocation functions, called as `allocate` documents.
        unsafe { allocate(layout, mi::mi_malloc, mi::mi_malloc_aligned) }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as in `alloc`, with the zeroing pair.
        unsafe { allocate(layout, mi::mi_zalloc, mi::mi_zalloc_aligned) }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from this allocator (the `GlobalAlloc` contract).
        unsafe { mi::mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let align = layout.align();
        // SAFETY: `ptr` came from this allocator; the new size and alignment as in `alloc`.
        unsafe {
            if natural(new_size, align) {
                mi::mi_realloc(ptr.cast::<c_void>(), new_size).cast()
            } else {
                mi::mi_realloc_aligned(ptr.cast::<c_void>(), new_size, align).cast()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_honour_every_alignment() {
        for align in [1, 2, 4, 8, 16, 32, 64, 128, 4096] {
            for size in [
                1, 3, 8, 12, 16, 24, 40, 48, 100, 1000, 1024, 1100, 4096, 4100, 65_536, 70_000,
            ] {
                let layout = Layout::from_size_align(size, align).expect("layout");
                // SAFETY: a non-zero size; freed with the layout it was allocated with.
                #[allow(unsafe_code)]
                unsafe {
                    let p = MiMalloc.alloc(layout);
                    assert!(!p.is_null());
                    assert_eq!(p as usize % align, 0, "size {size} align {align}");
                    p.write_bytes(0xab, size);
                    let q = MiMalloc.realloc(p, layout, size * 2 + 8);
                    assert!(!q.is_null());
                    assert_eq!(q as usize % align, 0, "realloc size {size} align {align}");
                    assert_eq!(*q.add(size - 1), 0xab);
                    let grown = Layout::from_size_align(size * 2 + 8, align).expect("layout");
                    MiMalloc.dealloc(q, grown);
                    let z = MiMalloc.alloc_zeroed(layout);
                    assert_eq!(z as usize % align, 0);
                    assert!(std::slice::from_raw_parts(z, size).iter().all(|&b| b == 0));
                    MiMalloc.dealloc(z, layout);
                }
            }
        }
    }
}
