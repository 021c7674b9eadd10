"""Launch recipes: usage text, `bash -n`, and the commands their --dry_run mode prints."""

import os
import shlex
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHELL_SCRIPTS = ("launch/tpu_vm.sh", "launch/xpk.sh", "launch/slurm.sh", "launch/local.sh")
MAIN_ARGS = ["configs/tokenizer.py:data=coinrun", "/shared/work dir", "--config.total_steps=7"]


def _run(argv, **env):
  return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60,
                        env={**os.environ, **env}, stdin=subprocess.DEVNULL, check=False)


@pytest.mark.parametrize("script", SHELL_SCRIPTS + ("launch/multiprocess_local.py",))
def test_scripts_are_executable_with_usage(script):
  path = os.path.join(REPO, script)
  assert os.access(path, os.X_OK), f"chmod +x {script}"
  if script.endswith(".sh"):
    assert _run(["bash", "-n", path]).returncode == 0
  proc = _run([path, "-h"])
  assert proc.returncode in (0, 2)
  usage = proc.stdout + proc.stderr
  assert "genie_jax.cli.train" in usage and "--config" in usage and "nvironment" in usage, usage


def _main_flags_in(argv):
  """Checks the genie_jax.cli.train flags in an argv list, or in a shell command line (such as an
  ssh --command or xpk --command value), as the shell would split it."""
  if isinstance(argv, str):
    argv = shlex.split(argv)
  command = [a.split("=", 1)[1] for a in argv if a.startswith("--command=")]
  if command:
    argv = shlex.split(command[0])
  main = argv[argv.index("genie_jax.cli.train") + 1:]
  # The workdir has a space: it must arrive as one argument.
  for flag in ("--config=configs/tokenizer.py:data=coinrun", "--workdir=/shared/work dir",
               "--config.total_steps=7", "--distributed=yes"):
    assert flag in main, (flag, main)
  return main


def test_tpu_vm_dry_run_creates_copies_runs_on_all_workers_and_deletes():
  proc = _run(["launch/tpu_vm.sh", "--dry_run", *MAIN_ARGS], TPU_NAME="pod", ZONE="z1",
              ACCELERATOR_TYPE="v5p-64", DATA_DIR="/shared/tfds")
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert lines[0].startswith("gcloud compute tpus tpu-vm create pod --zone=z1")
  assert "--accelerator-type=v5p-64" in lines[0]
  assert any("tpu-vm scp" in l and "--worker=all" in l for l in lines)
  (run,) = [l for l in lines if "genie_jax.cli.train" in l]
  assert "tpu-vm ssh pod" in run and "--worker=all" in run
  assert "--config.data.data_dir=/shared/tfds" in _main_flags_in(run)
  assert lines[-1].startswith("gcloud compute tpus tpu-vm delete pod --zone=z1")
  logs = _run(["launch/tpu_vm.sh", "--dry_run", "--steps=logs", *MAIN_ARGS]).stdout
  assert "--worker=0" in logs and "tail" in logs


def test_tpu_vm_data_bucket_is_mounted_with_gcsfuse_and_becomes_the_data_dir():
  proc = _run(["launch/tpu_vm.sh", "--dry_run", "--steps=copy,run", *MAIN_ARGS],
              TPU_NAME="pod", DATA_BUCKET="my-data", DATA_DIR="")
  assert proc.returncode == 0, proc.stderr
  (mount,) = [shlex.split(l) for l in proc.stdout.splitlines() if "gcsfuse" in l]
  (command,) = [a.split("=", 1)[1] for a in mount if a.startswith("--command=")]
  assert "--worker=all" in mount
  assert "gcsfuse --implicit-dirs my-data /gcs/my-data" in command
  assert "apt-get install -y -q gcsfuse" in command
  (run,) = [l for l in proc.stdout.splitlines() if "genie_jax.cli.train" in l]
  assert "--config.data.data_dir=/gcs/my-data/data" in _main_flags_in(run)
  plain = _run(["launch/tpu_vm.sh", "--dry_run", "--steps=copy", *MAIN_ARGS], DATA_BUCKET="")
  assert "gcsfuse" not in plain.stdout


def test_xpk_dry_run_creates_a_workload():
  proc = _run(["launch/xpk.sh", "--dry_run", "--steps=create,logs,delete", *MAIN_ARGS],
              CLUSTER="c1", WORKLOAD="w1", TPU_TYPE="v5e-256", NUM_SLICES="2")
  assert proc.returncode == 0, proc.stderr
  create, logs, delete = proc.stdout.splitlines()
  assert create.startswith("xpk workload create --cluster=c1 --workload=w1")
  assert "--tpu-type=v5e-256" in create and "--num-slices=2" in create
  _main_flags_in(create)
  assert "jobset-name=w1" in logs
  assert delete == "xpk workload delete --cluster=c1 --workload=w1 "
  assert _run(["launch/xpk.sh", "--dry_run", *MAIN_ARGS], CLUSTER="").returncode == 2


def test_slurm_dry_run_prints_an_sbatch_script_with_one_process_per_gpu():
  proc = _run(["launch/slurm.sh", "--dry_run", *MAIN_ARGS], NODES="4", GPUS_PER_NODE="8",
              PARTITION="gpu")
  assert proc.returncode == 0, proc.stderr
  out = proc.stdout
  for directive in ("--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8",
                    "--partition=gpu"):
    assert f"#SBATCH {directive}\n" in out
  (srun,) = [l for l in out.splitlines() if l.startswith("srun ")]
  assert srun.startswith("srun python -m genie_jax.cli.train ")
  _main_flags_in(srun)
  assert "sbatch" in out.splitlines()[-1]


def test_multiprocess_local_dry_run_gives_each_process_the_coordinator(monkeypatch):
  # The caller's XLA flags reach every process; its device count is replaced.
  monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/d --xla_force_host_platform_device_count=8")
  proc = _run([sys.executable, "launch/multiprocess_local.py", "--dry_run", "--num_processes=3",
               "--devices_per_process=2", "--port=12345", "--",
               "--config=" + MAIN_ARGS[0], "--workdir=/tmp/w"])
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert len(lines) == 3
  for i, line in enumerate(lines):
    assert line.startswith("JAX_PLATFORMS=cpu XLA_FLAGS='--xla_dump_to=/tmp/d "
                           "--xla_force_host_platform_device_count=2' "), line
    assert "-m genie_jax.cli.train" in line and "--workdir=/tmp/w" in line
    assert line.endswith(f"--coordinator_address=127.0.0.1:12345 --num_processes=3 "
                         f"--process_id={i}")
