//! The process's allocator (the `jemalloc` feature, on by default): each job allocates many
//! small, short-lived buffers (JSON, HTTP, AMQP frames) across threads, and glibc's malloc
//! spent a fifth of the daemon's CPU on them (see the README's "Performance"). An application
//! that brings its own `#[global_allocator]` turns the feature off.
#![allow(unsafe_code)]

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read as it starts: a background thread hands freed pages back to the
/// system within about a second, rather than on later allocations after ten: the memory of a
/// burst (thousands of jobs whose model answered at once) does not stay resident, and the
/// peak is lower. `_RJEM_MALLOC_CONF` in the environment still overrides them.
#[unsafe(export_name = "_rjem_malloc_conf")]
#[allow(non_upper_case_globals)]
static malloc_conf: Option<&'static std::ffi::c_char> =
    Some(unsafe { &*c"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0".as_ptr() });

/// Keeps [`malloc_conf`] in the final binary. jemalloc has a weak default of its own, and a
/// static nothing refers to lives in an archive member the linker need not pull in:
/// [`crate::App::run_cli`] (which `App::main` runs) calls this.
pub(crate) fn keep_options() {
    std::hint::black_box(&malloc_conf);
}
