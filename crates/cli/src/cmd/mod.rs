pub mod bench;
pub mod eval;
pub mod recommend;
pub mod split;
pub mod synth;
pub mod train;
