"""Thin Prefect tasks over the sparse_distill library: paths and small manifests in and out."""
