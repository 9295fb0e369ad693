//! The `kiln` command-line program; all logic lives in the library.

use std::process::ExitCode;

fn main() -> ExitCode {
    // Die quietly when a reader such as `head` closes the pipe, as Unix
    // tools do, instead of panicking in `println!`.
    #[cfg(unix)]
    // SAFETY: called first thing in `main`, before any thread exists; it
    // only restores the default action of one signal.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    kiln::cli::main()
}
