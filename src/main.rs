use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys::{
    mi_free, mi_malloc, mi_malloc_aligned, mi_realloc_aligned, mi_zalloc, mi_zalloc_aligned,
};

/// mimalloc rather than glibc's allocator: in the load benchmark glibc's
/// malloc/free took about a tenth of levee's CPU (per-request allocations are
/// small and short-lived, mimalloc's best case).
///
/// Not the `mimalloc` crate's allocator, which asks for every block through
/// `mi_malloc_aligned`: for a block over 1 KiB whose size class is not a power
/// of two (a request's boxed future, hyper's buffers as they grow) that call
/// takes mimalloc's over-allocating path, about 250 instructions more than
/// `mi_malloc` (five such blocks per proxied request). Every mimalloc block is
/// aligned to at least a machine word, so a layout asking no more than that
/// (nearly all of Rust's) needs no aligned call; mimalloc's own
/// `mi_realloc_aligned` reasons the same way.
struct Mimalloc;

const WORD: usize = std::mem::size_of::<usize>();

// SAFETY: every call passes mimalloc's contract through: blocks come from
// mimalloc and go back to it (`mi_free` takes aligned and plain blocks alike),
// and a plain `mi_malloc` is used only where its word alignment suffices.
unsafe impl GlobalAlloc for Mimalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: see the impl.
        unsafe {
            if layout.align() <= WORD {
                mi_malloc(layout.size()).cast()
            } else {
                mi_malloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: see the impl.
        unsafe {
            if layout.align() <= WORD {
                mi_zalloc(layout.size()).cast()
            } else {
                mi_zalloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: see the impl.
        unsafe { mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: see the impl (it takes the plain path itself for word alignment).
        unsafe { mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()).cast() }
    }
}

#[global_allocator]
static GLOBAL: Mimalloc = Mimalloc;

fn main() -> std::process::ExitCode {
    levee::cli::main()
}
