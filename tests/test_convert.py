#!/usr/bin/env python3
"""Tests for convert/convert.py, standard library only: python3 tests/test_convert.py [GOLDEN_DIR]

Builds real torch zip checkpoints without torch: fake `torch` / `torch._utils` modules give the
pickler the exact globals torch.save writes (torch._utils._rebuild_tensor_v2, torch.FloatStorage
as a persistent id, ...), and the zip is laid out as torch.save lays it out (<name>/data.pkl,
<name>/data/<key>, <name>/version, <name>/byteorder). Everything is written to a temporary folder.
GOLDEN_DIR defaults to ../shared/golden (relative to the current folder, then to the repo root).
"""
import collections, io, json, math, os, pickle, random, struct, subprocess, sys, tempfile, types, zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONVERT = os.path.join(ROOT, 'convert', 'convert.py')
SIZES = {'F64': 8, 'F32': 4, 'F16': 2, 'BF16': 2, 'I64': 8, 'I32': 4, 'U8': 1}
STORAGE = {'F64': 'DoubleStorage', 'F32': 'FloatStorage', 'F16': 'HalfStorage', 'BF16': 'BFloat16Storage',
           'I64': 'LongStorage', 'I32': 'IntStorage', 'U8': 'ByteStorage'}

# ---- fake torch: just enough module objects for pickle to write torch's GLOBAL opcodes ----
torch = types.ModuleType('torch')
torch_utils = types.ModuleType('torch._utils')
torch._utils = torch_utils
for _cls in STORAGE.values():
    setattr(torch, _cls, type(_cls, (), {'__module__': 'torch'}))


def _rebuild_tensor_v2(*args):
    raise AssertionError('never called')


def _rebuild_parameter(*args):
    raise AssertionError('never called')


for _f in (_rebuild_tensor_v2, _rebuild_parameter):
    _f.__module__ = 'torch._utils'
    setattr(torch_utils, _f.__name__, _f)
lightning = types.ModuleType('pytorch_lightning.callbacks.model_checkpoint')
lightning.ModelCheckpoint = type('ModelCheckpoint', (), {'__module__': lightning.__name__})
sys.modules.update({'torch': torch, 'torch._utils': torch_utils, lightning.__name__: lightning,
                    'pytorch_lightning': types.ModuleType('pytorch_lightning'),
                    'pytorch_lightning.callbacks': types.ModuleType('pytorch_lightning.callbacks')})


class FakeStorage:
    def __init__(self, dtype, data):
        self.dtype, self.data = dtype, data


class FakeTensor:
    def __init__(self, storage, offset, size, stride, param=False):
        self.args, self.param = (storage, offset, tuple(size), tuple(stride), False, collections.OrderedDict()), param

    def __reduce__(self):
        if self.param:
            return (_rebuild_parameter, (FakeTensor(*self.args[:4]), True, collections.OrderedDict()))
        return (_rebuild_tensor_v2, self.args)


def contiguous(shape):
    stride, acc = [], 1
    for n in reversed(shape):
        stride.insert(0, acc)
        acc *= n
    return stride


def tensor(dtype, shape, data, param=False):
    return FakeTensor(FakeStorage(dtype, data), 0, shape, contiguous(shape), param)


def write_ckpt(path, obj, name='archive', byteorder='little', drop=(), cut=None):
    """torch.save's layout; drop: storage keys left out; cut: {key: length} truncates a storage."""
    keys, storages = {}, []

    class TorchPickler(pickle.Pickler):
        def persistent_id(self, obj):
            if not isinstance(obj, FakeStorage):
                return None
            if id(obj) not in keys:
                keys[id(obj)] = str(len(storages))
                storages.append((keys[id(obj)], obj.data))
            return ('storage', getattr(torch, STORAGE[obj.dtype]), keys[id(obj)], 'cpu', len(obj.data) // SIZES[obj.dtype])
    buf = io.BytesIO()
    TorchPickler(buf, protocol=2).dump(obj)
    write_zip(path, name, buf.getvalue(), storages, byteorder, drop, cut or {})


def write_zip(path, name, pkl, storages=(), byteorder='little', drop=(), cut={}):
    with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as z:
        z.writestr(name + '/data.pkl', pkl)
        z.writestr(name + '/byteorder', byteorder)
        for key, data in storages:
            if key not in drop:
                z.writestr('%s/data/%s' % (name, key), data[:cut.get(key, len(data))])
        z.writestr(name + '/version', '3\n')


def read_safetensors(path):
    """{name: (dtype, shape, bytes)} and metadata; asserts the layout the C loader expects."""
    with open(path, 'rb') as f:
        blob = f.read()
    n = struct.unpack('<Q', blob[:8])[0]
    assert n % 8 == 0 and 8 + n <= len(blob), 'header length %d' % n
    header = json.loads(blob[8:8 + n].decode('utf-8'))
    data = blob[8 + n:]
    meta = header.pop('__metadata__', {})
    out, end = {}, 0
    for name in sorted(header, key=lambda k: header[k]['data_offsets']):
        e = header[name]
        b, en = e['data_offsets']
        assert b == end and en - b == math.prod(e['shape']) * SIZES[e['dtype']], 'offsets of %s' % name
        out[name], end = (e['dtype'], e['shape'], data[b:en]), en
    assert end == len(data), 'data block %d bytes, header covers %d' % (len(data), end)
    return meta, out


def f32(vals):
    return struct.pack('<%df' % len(vals), *vals)


# ---- the runner ----
RESULTS = collections.Counter()
TMP = tempfile.mkdtemp(prefix='test_convert_')


def report(status, name, why=''):
    RESULTS[status] += 1
    print(status + ' ' + name + (': ' + why if why else ''))


def check(name, fn):
    try:
        why = fn()
        report('SKIP', name, why) if why else report('PASS', name)
    except Exception as e:
        report('FAIL', name, '%s: %s' % (type(e).__name__, e))


def convert(ckpt, *opts, out=None):
    out = out or ckpt + '.safetensors'
    r = subprocess.run([sys.executable, CONVERT, ckpt, '--out', out] + list(opts),
                       capture_output=True, text=True, timeout=120)
    return r, out


def convert_ok(ckpt, *opts):
    r, out = convert(ckpt, *opts)
    assert r.returncode == 0, 'exit %d: %s' % (r.returncode, r.stderr.strip())
    return read_safetensors(out)


def convert_fails(ckpt, *expect):
    r, out = convert(ckpt)
    assert r.returncode != 0, 'exit status 0, expected an error'
    assert not os.path.exists(out) and not os.path.exists(out + '.tmp'), 'an output file was written'
    for word in expect:
        assert word in r.stderr, 'stderr lacks %r: %s' % (word, r.stderr.strip())


def path(name):
    return os.path.join(TMP, name)


def test_fp32_roundtrip():
    rng = random.Random(1)
    vals = [rng.gauss(0, 1) for _ in range(2 * 3 * 3 * 3)] + [-0.0, float('inf'), 1e-42]
    data = f32(vals)
    sd = collections.OrderedDict([('conv.weight', tensor('F32', (3, 2, 3, 3), data[:216], param=True)),
                                  ('conv.bias', tensor('F32', (3,), data[216:])), ('scale', tensor('F32', (), data[:4])),
                                  ('ids', tensor('I64', (1, 4), struct.pack('<4q', 0, 1, 2, 3)))])
    write_ckpt(path('a.pt'), sd)
    meta, got = convert_ok(path('a.pt'))
    assert meta == {'format': 'pt', 'source': 'a.pt'}, meta
    assert got['conv.weight'] == ('F32', [3, 2, 3, 3], data[:216]) and got['conv.bias'] == ('F32', [3], data[216:])
    assert got['scale'] == ('F32', [], data[:4]) and got['ids'][:2] == ('I64', [1, 4]), got.keys()


def test_fp16():
    rng = random.Random(2)
    vals = [rng.gauss(0, 1) * 10 ** rng.randint(-9, 3) for _ in range(5000)]
    vals = list(struct.unpack('<%df' % len(vals), f32(vals)))  # exactly representable in f32
    vals += [1 + 2 ** -11, 1 + 3 * 2 ** -11, 2 ** -25, 3 * 2 ** -25, 65504.0, 65519.0, -0.0]  # ties, subnormals
    big = [65520.0, -1e6, float('inf'), float('nan')]  # torch: >= 65520 rounds to inf; struct.pack raises
    big64 = [1e300, -1e300, float.fromhex('0x1.fffffefffffffp+127'), float('nan')]
    doubles = [rng.gauss(0, 1e3) for _ in range(100)]
    bf16 = b''.join(f32([rng.gauss(0, 100)])[2:] for _ in range(100))  # the top halves of f32s
    sd = {'a': tensor('F32', (len(vals),), f32(vals)), 'big': tensor('F32', (4,), f32(big)),
          'big64': tensor('F64', (4,), struct.pack('<4d', *big64)),
          'h': tensor('F16', (2,), struct.pack('<2e', 1.5, -2.0)), 'd': tensor('F64', (100,), struct.pack('<100d', *doubles)),
          'b': tensor('BF16', (100,), bf16)}
    write_ckpt(path('h.pt'), sd)
    _, got = convert_ok(path('h.pt'), '--fp16')
    expect = b''.join(struct.pack('<e', v) for v in vals)
    assert got['a'] == ('F16', [len(vals)], expect), 'F32 -> F16 differs from struct.pack("<e")'
    ties = got['a'][2][2 * (len(vals) - 7):2 * (len(vals) - 5)]  # halfway cases go to the even neighbour
    assert ties == struct.pack('<2H', 0x3c00, 0x3c02), ties.hex()
    assert got['big'][2] == struct.pack('<4H', 0x7c00, 0xfc00, 0x7c00, 0x7e00), got['big'][2].hex()
    assert got['h'] == ('F16', [2], struct.pack('<2e', 1.5, -2.0))
    assert got['d'][2] == b''.join(struct.pack('<e', v) for v in doubles)
    bf_as_f32 = struct.unpack('<100f', b''.join(b'\0\0' + bf16[i:i + 2] for i in range(0, 200, 2)))
    assert got['b'][2] == b''.join(struct.pack('<e', v) for v in bf_as_f32)
    _, got = convert_ok(path('h.pt'))
    assert got['d'] == ('F32', [100], struct.pack('<100f', *doubles)) and got['b'] == ('BF16', [100], bf16)
    assert got['big64'][2] == struct.pack('<4I', 0x7f800000, 0xff800000, 0x7f7fffff, 0x7fc00000), got['big64'][2].hex()
    assert got['h'][0] == 'F16' and got['a'][0] == 'F32'


def test_views():
    st = FakeStorage('F32', f32(range(24)))
    sd = {'t': FakeTensor(st, 0, (4, 3), (1, 4)),          # transpose of a (3, 4)
          'off': FakeTensor(st, 5, (2, 3), (3, 1)),        # storage offset, contiguous
          'perm': FakeTensor(st, 0, (3, 2, 4), (4, 12, 1)),  # permute of a (2, 3, 4)
          'expand': FakeTensor(st, 7, (2, 3), (0, 1)),      # stride 0
          'whole': FakeTensor(st, 0, (24,), (1,))}        # shares the storage
    write_ckpt(path('v.pt'), sd)
    _, got = convert_ok(path('v.pt'))
    want = {'t': [c * 4 + r for r in range(4) for c in range(3)], 'off': list(range(5, 11)),
            'perm': [b * 12 + a * 4 + c for a in range(3) for b in range(2) for c in range(4)],
            'expand': [7, 8, 9] * 2, 'whole': list(range(24))}
    for name, vals in want.items():
        assert got[name][2] == f32(vals), '%s: %s' % (name, struct.unpack('<%df' % len(vals), got[name][2]))
    assert got['perm'][1] == [3, 2, 4]


def test_big_endian():
    vals = [1.5, -2.25, 3e-3]
    write_ckpt(path('be.pt'), {'x': tensor('F32', (3,), struct.pack('>3f', *vals))}, byteorder='big')
    assert convert_ok(path('be.pt'))[1]['x'][2] == f32(vals)


def lightning_ckpt(state_dict):
    cb = lightning.ModelCheckpoint()
    cb.monitor, cb.best_model_path = None, '/logs/last.ckpt'
    return {'epoch': 3, 'global_step': 12000, 'pytorch-lightning_version': '1.4.2', 'state_dict': state_dict,
            'callbacks': {lightning.ModelCheckpoint: {'best_model_score': None, 'obj': cb}}, 'lr_schedulers': []}


def test_state_dict_wrapper():
    sd = collections.OrderedDict([('w', tensor('F32', (2,), f32([1, 2]))), ('step', 7)])
    write_ckpt(path('sd.ckpt'), lightning_ckpt(sd), name='v1-5-pruned')
    _, got = convert_ok(path('sd.ckpt'))
    assert list(got) == ['w'] and got['w'][2] == f32([1, 2]), got.keys()
    write_ckpt(path('m.bin'), {'model': {'w': tensor('F32', (1,), f32([3]))}, 'optimizer': {}})
    assert list(convert_ok(path('m.bin'))[1]) == ['w']


def test_ema():
    reg = ['model.diffusion_model.input_blocks.0.0.weight', 'model.diffusion_model.input_blocks.1.0.in_layers.0.bias',
           'model.diffusion_model.out.2.bias']
    sd = collections.OrderedDict((k, tensor('F32', (2,), f32([i, i]))) for i, k in enumerate(reg))
    for i, k in enumerate(reg):  # LitEma: 'model_ema.' + parameter name of self.model with '.' removed
        sd['model_ema.' + k[len('model.'):].replace('.', '')] = tensor('F32', (2,), f32([10 + i, 10 + i]))
    sd['model_ema.decay'] = tensor('F32', (), f32([0.9999]))
    sd['model_ema.num_updates'] = tensor('I32', (), struct.pack('<i', 5))
    sd['first_stage_model.conv.weight'] = tensor('F32', (1,), f32([42]))
    write_ckpt(path('ema.ckpt'), lightning_ckpt(sd))
    _, got = convert_ok(path('ema.ckpt'))
    assert sorted(got) == sorted(reg + ['first_stage_model.conv.weight']), sorted(got)
    for i, k in enumerate(reg):
        assert got[k][2] == f32([10 + i, 10 + i]), '%s not taken from EMA' % k
    _, got = convert_ok(path('ema.ckpt'), '--no-ema')
    assert got[reg[2]][2] == f32([2, 2]) and not any(k.startswith('model_ema') for k in got)
    _, got = convert_ok(path('ema.ckpt'), '--only-prefix', 'first_stage_model.')
    assert list(got) == ['first_stage_model.conv.weight']


def test_list():
    write_ckpt(path('l.pt'), {'enc.w': tensor('F32', (2, 3), f32(range(6)))})
    r, out = convert(path('l.pt'), '--list', '--fp16')
    assert r.returncode == 0 and 'enc.w' in r.stdout and 'F16' in r.stdout and '[2, 3]' in r.stdout, r.stdout
    assert not os.path.exists(out), '--list wrote a file'


class Evil:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return (self.fn, (self.arg,))


def test_malicious():
    marker = path('pwned')
    cases = {'os_system': ({'w': tensor('F32', (1,), f32([1])), 'x': Evil(os.system, 'touch ' + marker)}, 'system'),
             'eval': ({'x': Evil(eval, '__import__("os").system("touch %s")' % marker)}, 'eval')}
    for name, (obj, word) in cases.items():
        write_ckpt(path(name + '.pt'), obj)
        convert_fails(path(name + '.pt'), word)
    raw = {'inst': (b'(ios\nsystem\nS"touch %s"\ntp0\n.' % marker.encode(), 'os.system'),  # protocol 0 INST
           'getattr': (b'\x80\x02c__builtin__\ngetattr\n.', 'getattr'),
           'reconstructor': (b'\x80\x02ccopyreg\n_reconstructor\n.', 'copyreg._reconstructor'),
           'reduce_str': (b'\x80\x02X\x04\x00\x00\x00evil)R.', 'not callable'),  # REDUCE on a non-callable
           'reduce_storage_type': (b'\x80\x02ctorch\nFloatStorage\n)R.', 'error'),
           'bad_persid': (b'\x80\x02X\x03\x00\x00\x00abcQ.', 'persistent id')}
    for name, (pkl, word) in raw.items():
        write_zip(path(name + '.pt'), 'archive', pkl)
        convert_fails(path(name + '.pt'), word)
    assert not os.path.exists(marker), 'the payload ran'


def test_bad_files():
    with open(path('junk.ckpt'), 'wb') as f:
        f.write(b'this is not a checkpoint')
    convert_fails(path('junk.ckpt'), 'zip')
    with open(path('legacy.pt'), 'wb') as f:
        f.write(b'\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.' + b'\0' * 64)
    convert_fails(path('legacy.pt'), 'legacy')
    with zipfile.ZipFile(path('nopkl.pt'), 'w') as z:
        z.writestr('archive/version', '3\n')
    convert_fails(path('nopkl.pt'), 'data.pkl')
    sd = {'a': tensor('F32', (4,), f32([1, 2, 3, 4])), 'b': tensor('F32', (4,), f32([5, 6, 7, 8]))}
    write_ckpt(path('missing.pt'), sd, drop=('1',))
    convert_fails(path('missing.pt'), 'archive/data/1', 'missing')
    write_ckpt(path('short.pt'), sd, cut={'0': 10})
    convert_fails(path('short.pt'), 'truncated', '16 bytes')
    write_ckpt(path('view.pt'), {'a': FakeTensor(FakeStorage('F32', f32([1, 2])), 1, (2,), (1,))})
    convert_fails(path('view.pt'), 'past the end')
    write_ckpt(path('whole.pt'), sd)
    with open(path('whole.pt'), 'rb') as f:
        blob = f.read()
    with open(path('cut.pt'), 'wb') as f:
        f.write(blob[:len(blob) // 2])
    convert_fails(path('cut.pt'), 'cut.pt')


def golden_dir():
    arg = sys.argv[1] if len(sys.argv) > 1 else os.path.join('..', 'shared', 'golden')
    return arg if os.path.isabs(arg) or os.path.isdir(arg) else os.path.join(ROOT, arg)


CONVERTED = {}


def end_to_end(fname):
    src = os.path.join(golden_dir(), 'models', fname)
    if not os.path.exists(src):
        return 'no golden model ' + src
    meta, orig = read_safetensors(src)
    sd = collections.OrderedDict((k, tensor(dt, shape, data, param=i % 2 == 0))
                                 for i, (k, (dt, shape, data)) in enumerate(sorted(orig.items())))
    ckpt = path(fname.replace('.safetensors', '.ckpt'))
    write_ckpt(ckpt, lightning_ckpt(sd), name=os.path.basename(ckpt)[:-5])
    _, got = convert_ok(ckpt)
    assert sorted(got) == sorted(orig), 'key sets differ'
    bad = [k for k in orig if got[k] != orig[k]]
    assert not bad, '%d tensors differ, e.g. %s' % (len(bad), bad[0])
    CONVERTED[fname] = ckpt + '.safetensors'


def test_instastyle_info():
    exe = os.environ.get('INSTASTYLE') or os.path.join(ROOT, 'instastyle')
    if not os.path.isabs(exe):
        exe = os.path.join(ROOT, exe)
    if not os.access(exe, os.X_OK):
        return './instastyle not built'
    if 'tiny-sd15.ldm.safetensors' not in CONVERTED:
        return 'no converted golden model'
    folder = os.path.join(golden_dir(), 'models', 'tiny-sd15')
    r = subprocess.run([exe, 'info', '--model', CONVERTED['tiny-sd15.ldm.safetensors'],
                        '--tokenizer', os.path.join(folder, 'tokenizer'), '--config', folder],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, 'exit %d: %s' % (r.returncode, (r.stderr or r.stdout).strip()[-400:])


if __name__ == '__main__':
    check('fp32_roundtrip', test_fp32_roundtrip)
    check('fp16_round_to_nearest_even', test_fp16)
    check('views_offsets_strides', test_views)
    check('big_endian_byteorder', test_big_endian)
    check('state_dict_wrapper', test_state_dict_wrapper)
    check('ema_preference', test_ema)
    check('list', test_list)
    check('malicious_pickles_refused', test_malicious)
    check('bad_files', test_bad_files)
    check('end_to_end_ldm_f32', lambda: end_to_end('tiny-sd15.ldm.safetensors'))
    check('end_to_end_ldm_f16', lambda: end_to_end('tiny-sd15.ldm.fp16.safetensors'))
    check('instastyle_info', test_instastyle_info)
    print('%d passed, %d failed, %d skipped' % (RESULTS['PASS'], RESULTS['FAIL'], RESULTS['SKIP']))
    import shutil
    shutil.rmtree(TMP, ignore_errors=True)
    sys.exit(1 if RESULTS['FAIL'] else 0)
