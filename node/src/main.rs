/// jemalloc with background purging: memory freed after a burst (a connection flood, a large
/// batch) goes back to the system instead of staying in the process (see node/Cargo.toml).
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() {
    outpost::cli::main()
}
