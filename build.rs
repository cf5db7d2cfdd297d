// The migrations are embedded by `sqlx::migrate!`: rebuild when they change
// (a new migration file is not a source file cargo would otherwise track).
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
