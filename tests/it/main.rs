mod aarch64;
mod abi;
mod c_chat;
mod dequant;
mod kernels;
mod model;
mod reference;
mod tokenizer;
