mod aarch64;
mod c_chat;
mod kernels;
mod model;
mod reference;
mod tokenizer;
