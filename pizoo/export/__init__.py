"""Exporters: GGUF (llama.cpp) and TensorRT-LLM checkpoints. HF output is pizoo.checkpoint."""
