fn main() {
    println!("s")
}
