fn main() -> std::process::ExitCode {
    levee::cli::main()
}
