"""`fusec` with --device cuda served by the host-memory device double (tests/host_cuda.py),
for server tests of the CUDA path on a machine without a GPU:
    python tests/double_serve.py serve --device cuda ..."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import fusec.runtime.backends.cuda as cuda_backend  # noqa: E402
import fusec.runtime.device as device  # noqa: E402
from host_cuda import HostMemoryCuda  # noqa: E402

device.cuda_available = lambda: True
cuda_backend.CudaDevice = lambda cache=None: HostMemoryCuda(cache, total_bytes=2 << 30)

from fusec.cli.main import cli  # noqa: E402

cli(prog_name="fusec")
