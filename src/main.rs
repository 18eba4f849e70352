/// mimalloc rather than glibc's allocator: in the load benchmark glibc's
/// malloc/free took about a tenth of levee's CPU (per-request allocations are
/// small and short-lived, mimalloc's best case).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    levee::cli::main()
}
