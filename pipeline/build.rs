//! The SQL migrations are embedded at compile time (`refinery::embed_migrations!` in
//! `src/store/migrate.rs`): rebuild when any of them changes or one is added.
fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
