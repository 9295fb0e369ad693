//! The `kiln` command-line program; all logic lives in the library.

use std::process::ExitCode;

fn main() -> ExitCode {
    kiln::cli::main()
}
