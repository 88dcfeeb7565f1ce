//! `tether-worker`: one worker process. All of it lives in the worker
//! library (crate `worker/`); this file only hands over the arguments.

fn main() -> std::process::ExitCode {
    tether_worker::main()
}
