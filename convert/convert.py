#!/usr/bin/env python3
"""convert.py: a pickled PyTorch checkpoint (.ckpt, .bin, .pt) -> one safetensors file.
Standard library only: no torch, numpy or safetensors package is needed.

  python3 convert/convert.py v1-5-pruned.ckpt       # writes v1-5-pruned.safetensors
  python3 convert/convert.py model.ckpt --fp16 --out model.fp16.safetensors [--list] [--only-prefix P]...

Input: torch.save's zip format (torch >= 1.6): <dir>/data.pkl, raw storages <dir>/data/<key>,
<dir>/byteorder. A restricted unpickler understands only torch's tensor rebuild functions, storage
types, dtypes, torch.Size and OrderedDict; the harmless training entries of Lightning .ckpt files
(ModelCheckpoint callbacks, numpy scalars) become inert placeholders; any other global is refused
with an error naming it. Nothing from the file is ever executed.
The state dict is the top-level dict, or the dict under 'state_dict' (SD .ckpt), 'model' or
'module'; non-tensor entries are skipped with a note. When both model.diffusion_model.* and
model_ema.* exist (LDM's LitEma names a buffer after its parameter with every '.' removed), the EMA
weights replace the regular ones (unless --no-ema) and model_ema.* is dropped.

Output, the safetensors layout the C program loads: 8-byte little-endian header length, JSON header
(__metadata__ {format: pt, source: input file name}) padded with spaces to 8 bytes, tensors sorted
by name, written contiguous. F32/F16/BF16 are kept (--fp16: every float becomes F16, round to
nearest even as torch does, out of range -> +-inf); F64 -> F32; I64/I32/U8 kept; BOOL -> U8;
I16/I8 -> I32. Written to OUT.tmp, then renamed.
Left out: the legacy non-zip format (torch < 1.6: re-save with a recent torch), quantized and
sparse tensors.
"""
import argparse
import io, array, collections, json, math, os, pickle, pickletools, struct, sys, zipfile

SIZES = {'F64': 8, 'F32': 4, 'F16': 2, 'BF16': 2, 'I64': 8, 'I32': 4, 'I16': 2, 'I8': 1, 'U8': 1, 'BOOL': 1}
STORAGES = {'DoubleStorage': 'F64', 'FloatStorage': 'F32', 'HalfStorage': 'F16', 'BFloat16Storage': 'BF16',
            'LongStorage': 'I64', 'IntStorage': 'I32', 'ShortStorage': 'I16', 'CharStorage': 'I8',
            'ByteStorage': 'U8', 'BoolStorage': 'BOOL', 'UntypedStorage': 'U8'}
DTYPES = {'float64': 'F64', 'float32': 'F32', 'float16': 'F16', 'bfloat16': 'BF16', 'int64': 'I64',
          'int32': 'I32', 'int16': 'I16', 'int8': 'I8', 'uint8': 'U8', 'bool': 'BOOL'}
# Training bookkeeping found in Lightning .ckpt files: unpickled as inert placeholders.
HARMLESS = {('pytorch_lightning.callbacks.model_checkpoint', 'ModelCheckpoint'),
            ('pytorch_lightning.callbacks', 'model_checkpoint'), ('numpy.core.multiarray', 'scalar'),
            ('numpy.core.multiarray', '_reconstruct'), ('numpy', 'dtype'), ('numpy', 'ndarray'),
            ('_codecs', 'encode'), ('builtins', 'set'), ('__builtin__', 'set'), ('torch', 'device'),
            ('argparse', 'Namespace')}
LEGACY_MAGIC = b'\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19'  # pickle proto 2 + torch's legacy magic number


MAX_PICKLE_BYTES = 256 << 20


class ConvertError(Exception):
    pass


# Stand-ins for what whitelisted globals and persistent ids name: plain tuples, so a REDUCE on one fails.
StorageType = collections.namedtuple('StorageType', 'dtype')   # torch.FloatStorage etc.
DType = collections.namedtuple('DType', 'name')                # torch.float16 etc.
Storage = collections.namedtuple('Storage', 'dtype key numel')  # one data/<key> record, read lazily
# A view into a storage: offset, sizes and strides in elements of dtype (no __dict__: BUILD can't touch it)
Tensor = collections.namedtuple('Tensor', 'storage offset shape stride dtype')


class Inert:
    """Placeholder for a harmless object in a training checkpoint: built from nothing, runs nothing."""
    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def rebuild_tensor(storage, offset, size, stride, dtype=None):
    ok = isinstance(storage, Storage) and isinstance(offset, int) and offset >= 0
    ok = ok and all(isinstance(v, int) and v >= 0 for v in tuple(size) + tuple(stride)) and len(size) == len(stride)
    if not ok or (dtype is not None and not isinstance(dtype, DType)):
        raise ConvertError('malformed tensor in data.pkl: storage=%r offset=%r size=%r stride=%r'
                           % (storage, offset, size, stride))
    dt = DTYPES[dtype.name] if dtype is not None else storage.dtype
    if math.prod(size) > 0:
        end = (offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1) * SIZES[dt]
        if end > storage.numel * SIZES[storage.dtype]:
            raise ConvertError('tensor view [%d:%d] bytes lies past the end of storage %s (%d bytes)'
                               % (offset * SIZES[dt], end, storage.key, storage.numel * SIZES[storage.dtype]))
    return Tensor(storage, offset, tuple(size), tuple(stride), dt)


# torch._utils functions, as torch calls them: (storage, offset, size, stride, requires_grad, hooks, ...)
REBUILD = {'_rebuild_tensor': lambda st, off, size, stride: rebuild_tensor(st, off, size, stride),
           '_rebuild_tensor_v2': lambda st, off, size, stride, grad=False, hooks=None, meta=None:
               rebuild_tensor(st, off, size, stride),
           '_rebuild_tensor_v3': lambda st, off, size, stride, grad, hooks, dtype, meta=None:
               rebuild_tensor(st, off, size, stride, dtype),
           '_rebuild_parameter': lambda data, grad, hooks: data,
           '_rebuild_parameter_with_state': lambda data, grad, hooks, state: data}


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module == 'torch._utils' and name in REBUILD:
            return REBUILD[name]
        if module == 'torch' and name in STORAGES:
            return StorageType(STORAGES[name])
        if module == 'torch' and name in DTYPES:
            return DType(name)
        if module == 'torch' and name == 'Size':
            return tuple
        if module == 'collections' and name == 'OrderedDict':
            return collections.OrderedDict
        if (module, name) in HARMLESS or module.startswith('pytorch_lightning.'):
            return type(name, (Inert,), {})
        raise ConvertError("data.pkl refers to global '%s.%s', which is not allowed (expected only torch "
                           "tensor/storage/dtype globals and OrderedDict); nothing was executed" % (module, name))

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == 'storage'
                and isinstance(pid[1], StorageType) and isinstance(pid[4], int) and pid[4] >= 0):
            raise ConvertError("unexpected persistent id %r (expected ('storage', torch.XxxStorage, key, "
                               "location, numel))" % (pid,))
        return Storage(pid[1].dtype, str(pid[2]), pid[4])


def check_pickle(data, path):
    """Walks the opcodes before unpickling: a memo index or frame length larger than the pickle
    itself is a lie that would make the C unpickler allocate gigabytes."""
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name in ('PUT', 'BINPUT', 'LONG_BINPUT', 'GET', 'BINGET', 'LONG_BINGET', 'FRAME') and int(arg) > len(data):
                raise ConvertError('%s: data.pkl opcode %s has argument %s, beyond the pickle\'s %d bytes'
                                   % (path, op.name, arg, len(data)))
    except ConvertError:
        raise
    except Exception as e:
        raise ConvertError('%s: data.pkl is not a valid pickle: %s' % (path, e))


class Checkpoint:
    """An opened torch zip checkpoint: the unpickled object plus lazy access to its storages."""

    def __init__(self, path):
        self.path = path
        with open(path, 'rb') as f:
            head = f.read(16)
        if not zipfile.is_zipfile(path):
            if head.startswith(LEGACY_MAGIC):
                raise ConvertError('%s: legacy (non-zip, torch < 1.6) checkpoint; not supported. HINT: re-save '
                                   'it with a recent torch: torch.save(torch.load(p), p2)' % path)
            if len(head) >= 9 and head[8:9] == b'{':
                raise ConvertError('%s: this looks like a safetensors file already; no conversion needed' % path)
            if head.startswith(b'PK'):
                raise ConvertError('%s: the zip archive is truncated or damaged (no central directory)' % path)
            raise ConvertError('%s: expected a torch zip checkpoint (PK.. signature), found %r' % (path, head[:8]))
        try:
            self.zip = zipfile.ZipFile(path)
            pkls = [n for n in self.zip.namelist() if n.count('/') == 1 and n.endswith('/data.pkl')]
            if len(pkls) != 1:
                raise ConvertError('%s: expected exactly one <dir>/data.pkl entry, found %d (entries: %s)'
                                   % (path, len(pkls), ', '.join(self.zip.namelist()[:6])))
            self.dir = pkls[0][:-len('/data.pkl')]
            has_order = self.dir + '/byteorder' in self.zip.NameToInfo
            order = self.zip.read(self.dir + '/byteorder').decode() if has_order else 'little'
            if order not in ('little', 'big'):
                raise ConvertError("%s: byteorder record says %r, expected 'little' or 'big'" % (path, order))
            self.swap = order == 'big'  # storages are in the writer's byte order; output is little-endian
            # data.pkl is read whole first (it holds names and shapes only: a few MB for SD), so
            # a lying length inside the pickle fails at once instead of streaming the zip.
            size = self.zip.getinfo(pkls[0]).file_size
            if size > MAX_PICKLE_BYTES:
                raise ConvertError('%s: data.pkl is %d bytes, over the %d limit for a state dict'
                                   % (path, size, MAX_PICKLE_BYTES))
            pkl = self.zip.read(pkls[0])
            check_pickle(pkl, path)
            self.obj = RestrictedUnpickler(io.BytesIO(pkl), encoding='utf-8').load()
        except ConvertError as e:
            raise ConvertError(str(e) if str(e).startswith(path) else '%s: %s' % (path, e))
        except Exception as e:
            raise ConvertError('%s: cannot read the checkpoint: %s: %s' % (path, type(e).__name__, e))
        self.cache, self.uses = {}, collections.Counter()  # storages in use, and tensors left per storage

    def check_storage(self, st):
        info = self.zip.NameToInfo.get('%s/data/%s' % (self.dir, st.key))
        if info is None:
            raise ConvertError('%s: data.pkl references storage %r but the entry %s/data/%s is missing'
                               % (self.path, st.key, self.dir, st.key))
        if info.file_size < st.numel * SIZES[st.dtype]:
            raise ConvertError('%s: storage %s/data/%s is truncated: expected %d bytes (%d x %s), found %d'
                               % (self.path, self.dir, st.key, st.numel * SIZES[st.dtype], st.numel, st.dtype,
                                  info.file_size))

    def storage_bytes(self, st):
        if st.key not in self.cache:
            self.check_storage(st)
            try:
                data = self.zip.read('%s/data/%s' % (self.dir, st.key))
            except Exception as e:
                raise ConvertError('%s: cannot read storage %s/data/%s: %s' % (self.path, self.dir, st.key, e))
            if self.swap and SIZES[st.dtype] > 1:
                a = array.array({2: 'H', 4: 'I', 8: 'Q'}[SIZES[st.dtype]], data)
                a.byteswap()
                data = a.tobytes()
            self.cache[st.key] = data
        return self.cache[st.key]

    def tensor_bytes(self, t):
        """The tensor's elements in row-major order, little-endian, in its own dtype."""
        es, n = SIZES[t.dtype], math.prod(t.shape)
        buf = self.storage_bytes(t.storage)
        self.uses[t.storage.key] -= 1
        if self.uses[t.storage.key] <= 0:  # shared storages are read once and kept while needed
            del self.cache[t.storage.key]
        if n == 0:
            return b''
        expect = [math.prod(t.shape[i + 1:]) for i in range(len(t.shape))]
        if all(a == b or n1 == 1 for a, b, n1 in zip(t.stride, expect, t.shape)):
            return buf[t.offset * es:(t.offset + n) * es]
        mv = memoryview(buf)[:len(buf) // es * es].cast({1: 'B', 2: 'H', 4: 'I', 8: 'Q'}[es])
        out, last, step = [], t.shape[-1], t.stride[-1]

        def rows(dim, base):
            if dim == len(t.shape) - 1:
                out.append(mv[base:base + (last - 1) * step + 1:step].tobytes() if step
                           else mv[base:base + 1].tobytes() * last)
            else:
                for i in range(t.shape[dim]):
                    rows(dim + 1, base + i * t.stride[dim])
        rows(0, t.offset)
        return b''.join(out)


def out_dtype(dt, fp16):
    if dt in ('F64', 'F32', 'F16', 'BF16'):
        return 'F16' if fp16 else {'F64': 'F32'}.get(dt, dt)
    return {'BOOL': 'U8', 'I16': 'I32', 'I8': 'I32'}.get(dt, dt)


def pack_floats(fmt, vals):
    """struct rounds to nearest even like torch, but raises where torch gives +-inf."""
    try:
        return struct.pack('<%d%s' % (len(vals), fmt), *vals)
    except OverflowError:
        top = 65520.0 if fmt == 'e' else 3.4028235677973366e38  # halfway to the next power: rounds to inf
        vals = [math.copysign(math.inf, v) if abs(v) >= top else v for v in vals]
        return struct.pack('<%d%s' % (len(vals), fmt), *vals)


def convert_bytes(data, src, dst):
    if src == dst or (src, dst) == ('BOOL', 'U8'):
        return data
    if dst == 'I32':
        n = len(data) // SIZES[src]
        return struct.pack('<%di' % n, *struct.unpack('<%d%s' % (n, {'I16': 'h', 'I8': 'b'}[src]), data))
    if src == 'BF16':  # bf16 is the top half of an f32
        f32 = bytearray(len(data) * 2)
        f32[2::4], f32[3::4] = data[0::2], data[1::2]
        data, src = bytes(f32), 'F32'
        if dst == 'F32':
            return data
    es, fin, fout, out = SIZES[src], {'F64': 'd', 'F32': 'f', 'F16': 'e'}[src], {'F32': 'f', 'F16': 'e'}[dst], []
    chunk = (1 << 20) * es
    for i in range(0, len(data), chunk):
        part = data[i:i + chunk]
        out.append(pack_floats(fout, struct.unpack('<%d%s' % (len(part) // es, fin), part)))
    return b''.join(out)


def select_tensors(ckpt, args, note):
    obj = ckpt.obj
    if not isinstance(obj, dict):
        raise ConvertError('%s: expected a dict at the top of data.pkl, found %s' % (ckpt.path, type(obj).__name__))
    for key in ('state_dict', 'model', 'module'):
        if isinstance(obj.get(key), dict):
            note('using the state dict under %r' % key)
            obj = obj[key]
            break
    tensors, skipped = {}, []
    for k, v in obj.items():
        if isinstance(k, str) and isinstance(v, Tensor):
            tensors[k] = v
        else:
            skipped.append(str(k))
    if skipped:
        more = ' ...' if len(skipped) > 8 else ''
        note('skipped %d non-tensor entries: %s%s' % (len(skipped), ', '.join(skipped[:8]), more))
    ema = [k for k in tensors if k.startswith('model_ema.')]
    regular = [k for k in tensors if k.startswith('model.diffusion_model.')]
    if ema and regular:
        flat = {}
        for k in regular:  # LitEma: buffer name = parameter name without dots, under model_ema.
            flat.setdefault('model_ema.' + k[len('model.'):].replace('.', ''), []).append(k)
        used = 0
        for k in ema if not args.no_ema else []:
            names = flat.get(k, [])
            if len(names) == 1 and tensors[names[0]].shape == tensors[k].shape:
                tensors[names[0]] = tensors[k]
                used += 1
            elif names:
                note('EMA entry %s is ambiguous or has another shape than %s; kept the regular weight' % (k, names))
        for k in ema:
            del tensors[k]
        note('%d of %d model.diffusion_model.* tensors taken from model_ema.*; %d model_ema.* entries dropped'
             % (used, len(regular), len(ema)))
    if args.only_prefix:
        tensors = {k: v for k, v in tensors.items() if any(k.startswith(p) for p in args.only_prefix)}
    if not tensors:
        raise ConvertError('%s: no tensors to write (found none%s)' % (
            ckpt.path, ' with prefix ' + ' or '.join(args.only_prefix) if args.only_prefix else ''))
    return tensors


def write_safetensors(path, ckpt, tensors, fp16, meta):
    header, items, offset = {'__metadata__': meta}, [], 0
    for name in sorted(tensors):
        t = tensors[name]
        dt = out_dtype(t.dtype, fp16)
        nbytes = math.prod(t.shape) * SIZES[dt]
        header[name] = {'dtype': dt, 'shape': list(t.shape), 'data_offsets': [offset, offset + nbytes]}
        items.append((t, dt, nbytes))
        offset += nbytes
        ckpt.check_storage(t.storage)
        ckpt.uses[t.storage.key] += 1
    hb = json.dumps(header, separators=(',', ':')).encode('utf-8')
    hb += b' ' * (-len(hb) % 8)
    tmp = path + '.tmp'
    try:
        with open(tmp, 'wb') as f:
            f.write(struct.pack('<Q', len(hb)) + hb)
            for t, dt, nbytes in items:
                data = convert_bytes(ckpt.tensor_bytes(t), t.dtype, dt)
                assert len(data) == nbytes, (len(data), nbytes)
                f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return offset


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('input', help='a torch zip checkpoint (.ckpt, .bin, .pt)')
    ap.add_argument('--out', help='output path (default: the input with .safetensors)')
    ap.add_argument('--fp16', action='store_true', help='store every float tensor as F16')
    ap.add_argument('--only-prefix', action='append', default=[], metavar='P',
                    help='keep only keys starting with P (repeatable)')
    ap.add_argument('--no-ema', action='store_true', help='keep model.diffusion_model.* even when model_ema.* exists')
    ap.add_argument('--list', action='store_true', help='print names, dtypes and shapes; write nothing')
    args = ap.parse_args(argv)
    note = lambda msg: print('note: ' + msg, file=sys.stderr)
    try:
        ckpt = Checkpoint(args.input)
        tensors = select_tensors(ckpt, args, note)
        if args.list:  # names and shapes come from data.pkl alone: no storage is read
            for name in sorted(tensors):
                t = tensors[name]
                dt = out_dtype(t.dtype, args.fp16)
                print('%-80s %s %s' % (name, t.dtype if dt == t.dtype else t.dtype + '->' + dt, list(t.shape)))
            print('%d tensors' % len(tensors))
            return 0
        out = args.out or os.path.splitext(args.input)[0] + '.safetensors'
        if os.path.abspath(out) == os.path.abspath(args.input):
            raise ConvertError('%s: the output path is the input path; pass another --out' % out)
        meta = {'format': 'pt', 'source': os.path.basename(args.input)}
        nbytes = write_safetensors(out, ckpt, tensors, args.fp16, meta)
        print('wrote %s: %d tensors, %.1f MB' % (out, len(tensors), nbytes / 1e6))
        return 0
    except (ConvertError, OSError) as e:
        print('convert.py: error: %s' % e, file=sys.stderr)
    return 1


if __name__ == '__main__':
    sys.exit(main())
