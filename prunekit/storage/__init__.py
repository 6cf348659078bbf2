"""What is kept on disk: the zarr Hessian store (`hessian_store`), safetensors checkpoints read
and written a layer at a time (`checkpoint`), the packed model format (`packing`) and the
export of a final model into it (`export`)."""
