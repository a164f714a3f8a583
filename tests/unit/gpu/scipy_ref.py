# scipy_ref.py DIR NX NY NZ: the scipy / scikit-image answers that test_gpu_scipy.c compares
# the CPU backend with. Reads DIR/mask.u8 and DIR/img.f32 (x fastest, NX*NY*NZ voxels), writes
# one raw file per answer into DIR (names below). Run by /usr/bin/python3 (Debian's
# python3-skimage and python3-scipy); owned by the gpu/ tests, no state.
import sys

import numpy as np
import scipy.ndimage as ndi
from skimage import morphology

d, nx, ny, nz = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
shape = (nz, ny, nx)  # numpy's C order: x varies fastest, as in the volumes
mask = np.fromfile(d + "/mask.u8", dtype=np.uint8).reshape(shape) != 0
img = np.fromfile(d + "/img.f32", dtype="<f4").reshape(shape)


def put(name, a, dtype):
    np.ascontiguousarray(a, dtype=dtype).tofile(d + "/" + name)


def ellipsoid(radius, sp):
    """gpu_seg.h's element: offsets with (dx sx)^2 + (dy sy)^2 + (dz sz)^2 <= r^2 (1 + 1e-9)."""
    lim = radius * radius * (1 + 1e-9)
    reach = [0, 0, 0]
    for a in range(3):  # the largest k with (k s)^2 <= lim, as gpu_morph.c finds it
        while ((reach[a] + 1) * sp[a]) ** 2 <= lim:
            reach[a] += 1
    rx, ry, rz = reach
    z, y, x = np.mgrid[-rz:rz + 1, -ry:ry + 1, -rx:rx + 1]
    return ((x * sp[0]) ** 2 + (y * sp[1]) ** 2 + (z * sp[2]) ** 2) <= lim


# morphology: scikit-image's binary_* with ball(r) (unit spacing) or the ellipsoid
elements = {
    "r1": morphology.ball(1),
    "r2": morphology.ball(2),
    "r3": morphology.ball(3),
    "aniso": ellipsoid(2.5, (0.8, 0.8, 2.0)),
}
ops = {
    "erode": morphology.binary_erosion,
    "dilate": morphology.binary_dilation,
    "open": morphology.binary_opening,
    "close": morphology.binary_closing,
}
for en, fp in elements.items():
    for on, fn in ops.items():
        put("morph_%s_%s.u8" % (on, en), fn(mask, fp), np.uint8)

# connected components: scipy.ndimage.label numbers components in raster order of their
# first voxel; 2D connectivities are 3D structures with empty z planes
s6 = ndi.generate_binary_structure(3, 1)
s26 = ndi.generate_binary_structure(3, 3)
s4 = s6.copy()
s4[0] = s4[2] = False
s8 = s26.copy()
s8[0] = s8[2] = False
structs = {6: s6, 26: s26, 4: s4, 8: s8}
for conn, st in structs.items():
    lab, n = ndi.label(mask, structure=st)
    put("label_%d.i32" % conn, lab, "<i4")
    put("sizes_%d.u64" % conn, np.bincount(lab.ravel(), minlength=n + 1), "<u8")

# hole filling: binary_fill_holes in 3D, and slice by slice for the 2D connectivities
put("fill_6.u8", ndi.binary_fill_holes(mask), np.uint8)
put("fill_26.u8", ndi.binary_fill_holes(mask, structure=np.ones((3, 3, 3))), np.uint8)
put("fill_4.u8", np.stack([ndi.binary_fill_holes(s) for s in mask]), np.uint8)
put("fill_8.u8", np.stack([ndi.binary_fill_holes(s, structure=np.ones((3, 3))) for s in mask]),
    np.uint8)

# resampling: output voxel i sits at the continuous input index i * float32(out / in) (one
# float32 product, as in gpu_seg.h); scipy interpolates in double with edge values repeated
cases = {
    "down": ((0.7, 0.9, 2.5), (1.0, 1.0, 1.5)),
    "up": ((2.0, 1.0, 3.0), (1.0, 0.5, 1.0)),
}
for name, (sp_in, sp_out) in cases.items():
    dims = [max(1, int(np.floor(n * a / b + 0.5))) for n, a, b in zip((nx, ny, nz), sp_in, sp_out)]
    axes = []
    for n_out, a, b in zip(dims, sp_in, sp_out):
        r = np.float32(b / a)
        axes.append(np.arange(n_out, dtype=np.float32) * r)
    px, py, pz = axes
    zz, yy, xx = np.meshgrid(pz, py, px, indexing="ij")
    coords = [zz.astype(np.float64), yy.astype(np.float64), xx.astype(np.float64)]
    lin = ndi.map_coordinates(img.astype(np.float64), coords, order=1, mode="nearest")
    near = ndi.map_coordinates(mask.astype(np.uint8), coords, order=0, mode="nearest")
    put("rs_%s_linear.f32" % name, lin, "<f4")
    put("rs_%s_nearest.u8" % name, near, np.uint8)
    with open(d + "/rs_%s.dims" % name, "w") as f:
        f.write("%d %d %d\n" % tuple(dims))
print("ok")
