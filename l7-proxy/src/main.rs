fn main() {
    eprintln!("l7-proxy: not implemented yet");
    std::process::exit(2);
}
