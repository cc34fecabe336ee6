"""tests/gpu/emu/transform.py SRC DST - copy the CUDA backend's sources for the emulator: kernel launches
name<<<grid, block, smem, stream>>>(args) become emu_launch(...) calls and `extern __shared__ float x[];`
becomes a pointer to the emulated dynamic shared memory.  Handles the launch forms used in model/cuda/."""
import re, sys, os, shutil
def split_top(s):
    out, depth, cur = [], 0, ''
    for ch in s:
        if ch in '([{': depth += 1
        if ch in ')]}': depth -= 1
        if ch == ',' and depth == 0:
            out.append(cur); cur = ''
        else:
            cur += ch
    out.append(cur)
    return out

src, dst = sys.argv[1], sys.argv[2]
os.makedirs(dst, exist_ok=True)
for f in os.listdir(src):
    s = open(os.path.join(src, f)).read()
    if f.endswith('.cu') or f.endswith('.cuh'):
        s = re.sub(r'extern __shared__ float (\w+)\[\];', r'float *\1 = (float *)emu_dyn_smem;', s)
        def launch(m):
            name, cfg, args = m.group(1), m.group(2), m.group(3)
            parts = [p.strip() for p in split_top(cfg)]
            while len(parts) < 3: parts.append('0')
            return 'emu_launch(dim3(%s), dim3(%s), %s, "%s", (const void *)(%s), [&]{ %s(%s); });' % (
                parts[0], parts[1], parts[2], name, name, name, args)
        s = re.sub(r'([\w:<>, ]*?\w>?)<<<(.*?)>>>\((.*?)\);', launch, s, flags=re.S)
    open(os.path.join(dst, f), 'w').write(s)

