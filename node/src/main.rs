fn main() {
    outpost::cli::main()
}
