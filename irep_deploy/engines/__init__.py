"""Deployment engines: ONNX export and verification, onnxruntime sessions, TensorRT engines.

onnx, onnxruntime and tensorrt are optional extras: each module imports them inside its functions
and raises an :class:`~irep_deploy.errors.IrepError` naming the missing package.
"""
from __future__ import annotations
