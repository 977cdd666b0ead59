pub mod bench;
pub mod demo;
pub mod eval;
pub mod recommend;
pub mod split;
pub mod synth;
pub mod train;
