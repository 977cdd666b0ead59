pub mod bench;
pub mod bench_ann;
pub mod demo;
pub mod eval;
pub mod recommend;
pub mod split;
pub mod synth;
pub mod train;
