mod kernels;
mod reference;
