"""Bad inputs through the real entry point: each gives one line on stderr, exit status 2 and no traceback,
within 10 s, before the workdir (and so any checkpoint) exists. README.md "Troubleshooting" lists them.

A fresh `python -m diffuseg_jax.main` spends ~5 s importing jax and the package, so the cases run in forked
children of one server process that has done those imports once; each child calls `main.run()` with the
case's argv, as the command line does (the server never starts a jax backend, so forking it is safe).
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.fixtures import REPO, random_volume, write_image, write_labels_json, write_volume

SERVER = r'''
import json, os, sys, time
import diffuseg_jax.main, diffuseg_jax.pipeline, diffuseg_jax.preflight  # the imports every case shares

for line in sys.stdin:
  case = json.loads(line)
  start = time.perf_counter()
  pid = os.fork()
  if pid == 0:
    os.chdir(case['cwd'])
    os.environ.update(case['env'])
    for name, fd in (('stdout', 1), ('stderr', 2)):
      os.dup2(os.open(case[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    sys.argv = ['diffuseg_jax.main', *case['argv']]
    code = 1
    try:
      diffuseg_jax.main.run()
      code = 0
    except SystemExit as e:
      code = e.code if isinstance(e.code, int) else int(e.code is not None)
    except BaseException:
      import traceback
      traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
  _, status = os.waitpid(pid, 0)
  print(json.dumps({'rc': os.waitstatus_to_exitcode(status), 'seconds': time.perf_counter() - start}), flush=True)
'''


class EntryPoint:
  """`python -m diffuseg_jax.main ARGS`, served from one process with the imports done (module docstring)."""

  def __init__(self):
    env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
    self.proc = subprocess.Popen([sys.executable, '-c', SERVER], cwd=REPO, env=env, text=True,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE)

  def __call__(self, args: list[str], tmp: pathlib.Path, env: dict | None = None) -> dict:
    out, err = tmp / 'stdout.txt', tmp / 'stderr.txt'
    case = dict(argv=args, cwd=str(REPO), env=env or {}, stdout=str(out), stderr=str(err))
    self.proc.stdin.write(json.dumps(case) + '\n')
    self.proc.stdin.flush()
    result = json.loads(self.proc.stdout.readline())
    return dict(result, stdout=out.read_text(), stderr=err.read_text())

  def close(self):
    self.proc.stdin.close()
    self.proc.wait(timeout=30)


@pytest.fixture(scope='module')
def entry():
  server = EntryPoint()
  yield server
  server.close()


# --- tiny folder datasets (16 x 16 PNGs unless a case changes them) -------------------------------------------

def mask(values=(0, 1), size=16) -> np.ndarray:
  m = np.full((size, size), values[0], np.uint8)
  m[4:12, 4:12] = values[1]
  return m


def image(rng, size=16, channels=None) -> np.ndarray:
  return rng.integers(0, 256, (size, size) if channels is None else (size, size, channels), dtype=np.uint8)


def folder(root: pathlib.Path, source_values=(0, 1), test_values=(0, 1)) -> pathlib.Path:
  """source and test: 2 gray images + masks; target: 2 unlabelled RGB images."""
  rng = np.random.default_rng(0)
  for split, values in (('source', source_values), ('test', test_values)):
    for k in range(2):
      write_image(root / split / 'images' / f'{split}{k}.png', image(rng))
      write_image(root / split / 'labels' / f'{split}{k}.png', mask(values))
  for k in range(2):
    write_image(root / 'target' / 'images' / f't{k}.png', image(rng, channels=3))
  return root


def no_test_images(root):
  for path in (root / 'test' / 'images').iterdir():
    path.unlink()


def corrupt_image(root):
  (root / 'source' / 'images' / 'source0.png').write_bytes(b'not a png at all')


def small_mask(root):
  write_image(root / 'source' / 'labels' / 'source0.png', mask(size=8))


def jpeg_masks(root, with_json=False):
  for path in (root / 'source' / 'labels').glob('*.png'):
    path.unlink()
    write_image(path.with_suffix('.jpg'), mask((0, 255)))
  if with_json:
    write_labels_json(root, {0: 'background', 255: 'object'})


def interpolated_mask(root):
  smooth = np.linspace(0, 255, 16 * 16).reshape(16, 16).astype(np.uint8)  # e.g. a mask resized bilinearly
  write_image(root / 'source' / 'labels' / 'source0.png', smooth)


def masks_255_in_test(root):
  folder(root, test_values=(0, 255))


def value_not_in_json(root):
  write_labels_json(root, {0: 'background', 1: 'object'})
  write_image(root / 'test' / 'labels' / 'test1.png', mask((0, 2)))


def colour_mask(root):
  write_image(root / 'source' / 'labels' / 'source0.png', np.stack([mask()] * 2 + [mask() * 0], -1))


def black_image(root):
  write_image(root / 'source' / 'images' / 'source1.png', np.zeros((16, 16), np.uint8))


def empty_source_masks(root):
  for k in range(2):
    write_image(root / 'source' / 'labels' / f'source{k}.png', mask((0, 0)))


def missing_label(root):
  (root / 'test' / 'labels' / 'test1.png').unlink()


def bad_labels_json(root):
  (root / 'labels.json').write_text('{"0": "background", ')


def constant_volume_tree(root):
  """A NIfTI folder dataset whose second source volume is one constant value."""
  shutil.rmtree(root)
  rng = np.random.default_rng(0)
  shape = (4, 8, 6)
  label = np.zeros(shape, np.uint8)
  label[1:3, 2:6, 2:4] = 1
  for split, names in (('source', ('s1', 's2')), ('target', ('t1',)), ('test', ('x1',))):
    for name in names:
      vol = np.full(shape, 300, np.int16) if name == 's2' else random_volume(rng, shape)
      write_volume(root / split / 'images' / f'{name}.nii.gz', vol)
      if split != 'target':
        write_volume(root / split / 'labels' / f'{name}.nii.gz', label)


TEST = ['--config=configs/test.py']
FOLDER = ['--config=configs/folder.py', '--config.data.image_size=16',
          '--config.segmentation.strategies=transfer,diffuseg']

# (id, argv, data builder or None, the message's key part). `ROOT` in argv is the case's data folder.
CASES = [
    # The command line and the config.
    ('missing --config', [], None, '--config is required'),
    ('config file not found', ['--config=configs/nope.py'], None,
     'cannot load --config: file not found: configs/nope.py'),
    ('unknown variant', ['--config=configs/test.py:fast'], None, "unknown variant 'fast'"),
    ('misspelt field', [*TEST, '--config.vae.batchsize=8'], None,
     'unknown config field vae.batchsize (did you mean vae.batch_size?)'),
    ('misspelt section', [*TEST, '--config.vea.batch_size=8'], None,
     'unknown config field vea.batch_size (did you mean vae.batch_size?)'),
    ('non-numeric value', [*TEST, '--config.vae.batch_size=abc'], None, "config.vae.batch_size='abc': not an integer"),
    ('non-boolean value', [*TEST, '--config.train.progress=maybe'], None, 'not True or False'),
    ('negative steps', [*TEST, '--config.vae.teacher_steps=-5'], None, 'vae.teacher_steps=-5 must be a positive'),
    ('unknown dataset', [*TEST, '--config.data.name=cifar'], None, "config.data.name='cifar' is not one of"),
    ('unknown strategy', [*TEST, '--config.segmentation.strategies=transfer,magic'], None, 'magic'),
    ('self-training without its labeller', [*TEST, '--config.segmentation.strategies=transfer,diffuseg_st'], None,
     'diffuseg_st self-trains on the pseudo-labels of diffuseg: add diffuseg'),
    ('unknown stage', [*TEST, '--config.stages=teacher,painting'], None, 'painting'),
    ('unknown augmented strategy', [*TEST, '--config.segmentation.augment_intensity=transfer,tranfer'], None,
     "config.segmentation.augment_intensity='transfer,tranfer': unknown ['tranfer'] (did you mean 'transfer'?)"),
    ('unknown distillation set', [*TEST, '--config.vae.distill_on=source'], None, "config.vae.distill_on='source'"),
    ('misspelt flag of the command', [*TEST, '--noprogress'], None,
     'unknown flag --noprogress (did you mean --no_progress?)'),
    ('unknown curve family', [*TEST, '--config.vae.source_intensity_curves=wavy'], None,
     "config.vae.source_intensity_curves='wavy' is not one of monotone, any"),
    ('second round that reads no label', [*TEST, '--config.diffusion.pseudo_labels_from=diffuseg',
                                          '--config.sampling.region_content=label'], None,
     "config.diffusion.pseudo_labels_from='diffuseg' changes the target labels"),
    ('unknown teacher choice', [*TEST, '--config.vae.select=best'], None,
     "config.vae.select='best' is not one of val, last"),
    ('unknown mask set', [*TEST, '--config.sampling.mask_set=all'], None, "config.sampling.mask_set='all'"),
    ('reversed percentiles', [*TEST, '--config.data.percentiles=(99.5,0.5)'], None,
     'data.percentiles=(99.5, 0.5) must be (low, high) with 0 <= low < high <= 100'),
    ('percentile above 100', [*TEST, '--config.data.percentiles=(0,150)'], None, 'data.percentiles=(0, 150)'),
    ('batch vs devices', [*TEST, '--config.vae.batch_size=12'], None,
     'config.vae.batch_size=12 must be a multiple of 8 (8 data-parallel device(s), 1 process(es))'),
    ('image size vs segmentation levels', [*TEST, '--config.segmentation.levels=5'], None,
     'config.segmentation.levels=5: data.image_size=16 is not divisible by 2^5 = 32'),
    ('image size vs vae levels', [*TEST, '--config.data.image_size=20', '--config.vae.levels=3',
                                  '--config.segmentation.levels=1'], None, 'config.vae.levels=3'),
    ('image size vs diffusion depth', [*TEST, '--config.diffusion.channel_mult=(1,2,2,2,2,2)'], None,
     'config.diffusion.channel_mult=(1, 2, 2, 2, 2, 2): data.image_size=16 is not divisible by'),
    ('image size vs autoencoder', ['--config=configs/test.py:kl', '--config.autoencoder.downsample=32'], None,
     'config.autoencoder.downsample=32 must be a power of two >= 2 dividing data.image_size=16'),
    ('bad channel count', [*TEST, '--config.data.channels=2'], None, 'config.data.channels=2 must be None, 1 or 3'),
    ('bad slice axis', [*TEST, '--config.data.slice_axis=3'], None, 'config.data.slice_axis=3 must be 0, 1 or 2'),
    ('no data root', ['--config=configs/folder.py'], None, 'config.data.root is required'),
    # The data (a folder dataset).
    ('data root not found', [*FOLDER, '--config.data.root=ROOT/nowhere'], None, 'data root folder not found'),
    ('empty split', [*FOLDER, '--config.data.root=ROOT'], no_test_images, 'no image files'),
    ('image without label', [*FOLDER, '--config.data.root=ROOT'], missing_label, 'no label file named test1.*'),
    ('unreadable image', [*FOLDER, '--config.data.root=ROOT'], corrupt_image, 'cannot read image'),
    ('image/label shapes differ', [*FOLDER, '--config.data.root=ROOT'], small_mask,
     'mask shape (8, 8) differs from image (16, 16)'),
    ('colour mask', [*FOLDER, '--config.data.root=ROOT'], colour_mask, 'colour mask'),
    ('interpolated mask', [*FOLDER, '--config.data.root=ROOT'], interpolated_mask,
     'source0.png: 256 distinct label values (0, 1, 2, 3, ..., 255); a mask holds a few class values'),
    ('JPEG masks', [*FOLDER, '--config.data.root=ROOT'], jpeg_masks, 'JPEG is lossy'),
    ('JPEG masks with labels.json', [*FOLDER, '--config.data.root=ROOT'],
     lambda root: jpeg_masks(root, with_json=True), 'JPEG is lossy'),
    ('value not in labels.json', [*FOLDER, '--config.data.root=ROOT'], value_not_in_json,
     'test1.png: unexpected label values 2 (expected one of [0, 1])'),
    ('labels.json not JSON', [*FOLDER, '--config.data.root=ROOT'], bad_labels_json, 'labels.json: not valid JSON'),
    ('no shared foreground', [*FOLDER, '--config.data.root=ROOT'], masks_255_in_test,
     'the source and test labels share no foreground value (source 1; test 255)'),
    ('empty source masks', [*FOLDER, '--config.data.root=ROOT'], empty_source_masks,
     'the source labels are all background'),
    ('constant image', [*FOLDER, '--config.data.root=ROOT'], black_image,
     'source1.png: every pixel of the image has the same value'),
    ('constant volume', [*FOLDER, '--config.data.root=ROOT'], constant_volume_tree,
     'the image is constant after intensity normalisation'),
    ('oracle strategy without target labels', [*FOLDER, '--config.data.root=ROOT',
                                               '--config.segmentation.strategies=transfer,self,diffuseg'],
     None, 'segmentation strategies self train on target labels, and the target split has none'),
]


@pytest.mark.parametrize('args, build, expected', [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line(entry, tmp_path, args, build, expected):
  root, workdir = tmp_path / 'data', tmp_path / 'wd'
  if any('ROOT' in a for a in args):
    folder(root)
  if build is not None:
    build(root)
  args = [a.replace('ROOT', str(root)) for a in args] + [f'--workdir={workdir}']
  result = entry(args, tmp_path)
  lines = [line for line in result['stderr'].splitlines() if line.strip()]
  assert result['rc'] == 2, result
  assert 'Traceback' not in result['stderr'] + result['stdout'], result['stderr']
  assert len(lines) == 1 and lines[0].startswith('error: '), result['stderr']
  assert expected in lines[0], lines[0]
  assert not workdir.exists()  # stopped before any stage output, checkpoints included
  assert result['seconds'] < 10, result['seconds']


def test_data_summary_and_oracle_warning(entry, tmp_path):
  """One line per split with its classes and raw label values; mask_set=test is announced as an ORACLE."""
  root = folder(tmp_path / 'data', source_values=(0, 1), test_values=(0, 255))
  result = entry([*FOLDER, f'--config.data.root={root}', '--config.sampling.mask_set=test',
                  f'--workdir={tmp_path}/wd'], tmp_path)
  out = result['stdout']
  assert 'warning: sampling.mask_set=test' in out and 'ORACLE' in out
  assert 'data source: 2 images; classes (raw label values): background (0), label_1 (1)' in out
  assert 'data target: 2 images, unlabelled' in out
  assert 'data test: 2 images; classes (raw label values): background (0), label_255 (255)' in out


def test_tilde_paths_are_expanded(entry, tmp_path):
  """`--config.data.root=~/x` and `--workdir=~/x` (a shell leaves `~` after `=`) mean the home folder, not a
  folder named `~` in the current one."""
  home = tmp_path / 'home'
  home.mkdir()
  (home / 'file').write_text('')
  result = entry([*FOLDER, '--config.data.root=~/nowhere', f'--workdir={tmp_path}/wd'], tmp_path, {'HOME': str(home)})
  assert f'error: {home}/nowhere: data root folder not found' in result['stderr'], result['stderr']
  result = entry([*TEST, '--workdir=~/file/wd'], tmp_path, {'HOME': str(home)})
  assert f"error: workdir '{home}/file/wd' is not writable" in result['stderr'], result['stderr']
  assert not (REPO / '~').exists()


def test_readme_troubleshooting_lists_every_case():
  text = (REPO / 'README.md').read_text()
  section = text.split('\n## Troubleshooting\n', 1)[1].split('\n## ', 1)[0]
  rows = [line for line in section.splitlines() if line.startswith('| `error: ') or ' | `error: ' in line]
  assert len(rows) >= 20
  for name, _, _, expected in CASES:
    assert expected in section, (name, expected)
