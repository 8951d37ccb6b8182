//! `sqlx::migrate!` embeds the migrations folders when the crate compiles, but cargo does not know
//! it reads them: a migration added or edited would be left out until something else changed.

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
