fn main() {
    eprintln!("lbctl: not implemented yet");
    std::process::exit(2);
}
