//! `tether-worker`: one worker process. All of it lives in the worker
//! library (crate `worker/`); this file only hands over the arguments.

/// mimalloc instead of glibc's malloc: the worker allocates on its
/// runtime threads and on blocking threads and frees across them, which
/// glibc's per-thread arenas handle badly (profiles of reconnect storms
/// showed malloc_consolidate among the top symbols).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    tether_worker::main()
}
