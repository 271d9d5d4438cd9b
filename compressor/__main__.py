"""`python -m compressor ...` (and `accelerate launch -m compressor ...` on several GPUs) runs the CLI."""
from .cli import app

app()
