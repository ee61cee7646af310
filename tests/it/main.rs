mod aarch64;
mod abi;
mod attention;
mod c_chat;
mod kernels;
mod model;
mod reference;
mod tokenizer;
