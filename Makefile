# radpipe: one build for everything: libcommon.a, libgpu.a, the four services, the dev
# stack tools and the tests.
#   make run     install what is missing, build, start the embedded stack (foreground)
#   make test    install what is missing, build with ASan+UBSan, run every test
#   make bench   benchmarks against peer tools, ratios measured in the same run
#   make fuzz    libFuzzer targets for a short run each (FUZZ_SECONDS)
#   make lint    clang-format check, cppcheck, clang-tidy
#   make all     build only (MODE=release in build/release, MODE=test in build/test)
# CUDA is optional: nvcc on PATH or in /usr/local/cuda enables gpu/cuda; `make NVCC=` forces
# the CPU-only build.

.DEFAULT_GOAL := all
.SUFFIXES:
.DELETE_ON_ERROR:

MODE ?= release
BUILD := build/$(MODE)
CC := gcc
CXX := g++

PKGS := rdkafka libpq libcjson libcurl libcrypto libpng zlib expat libarchive
PKG_CFLAGS := $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
PKG_LIBS := $(shell pkg-config --libs $(PKGS) 2>/dev/null)
GDCM_CFLAGS := -I/usr/include/gdcm-3.0
GDCM_LIBS := -lgdcmMSFF -lgdcmDSED -lgdcmCommon -lgdcmDICT -lgdcmIOD
LIBS := $(PKG_LIBS) -lcivetweb -lniftiio -lznz $(GDCM_LIBS) -lstdc++ -lm -lpthread -ldl

WARN := -Wall -Wextra -Werror -Wshadow -Wformat=2 -Wno-missing-field-initializers \
        -Wno-format-truncation
INCS := -Ilibcommon/include -Igpu -I$(BUILD)/gen -I/usr/include/nifti $(PKG_CFLAGS)
ifneq ($(filter test%,$(MODE)),)
  # test, or test<suffix> for a private build directory with the same flags
  OPT := -O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all
  LDOPT := -fsanitize=address,undefined
else ifeq ($(MODE),fuzz)
  # libFuzzer: clang, the library instrumented for coverage, no CUDA
  CC := clang
  CXX := clang++
  NVCC :=
  OPT := -O1 -g -fsanitize=address,undefined,fuzzer-no-link -fno-omit-frame-pointer
  LDOPT := -fsanitize=address,undefined
  WARN += -Wno-unknown-warning-option
else
  OPT := -O2 -g -D_FORTIFY_SOURCE=2 -fstack-protector-strong
  LDOPT :=
endif

# CUDA: nvcc from PATH, else the standard install location. CUDA_HOME is the toolkit that
# holds libcudart_static.a: nvcc's own parent when it is a real toolkit, else /usr/local/cuda
# (an nvcc on PATH may be a wrapper script in /usr/local/bin). No runtime found: CPU build.
NVCC ?= $(firstword $(shell command -v nvcc 2>/dev/null) $(wildcard /usr/local/cuda/bin/nvcc))
cuda_rt = $(firstword $(wildcard $(1)/lib64/libcudart_static.a $(1)/lib/libcudart_static.a \
            $(1)/targets/x86_64-linux/lib/libcudart_static.a))
ifneq ($(strip $(NVCC)),)
  CUDA_HOME ?= $(firstword $(foreach d,$(abspath $(dir $(realpath $(NVCC)))..) \
                 $(abspath $(dir $(NVCC))..) /usr/local/cuda,$(if $(call cuda_rt,$(d)),$(d))))
  ifeq ($(strip $(CUDA_HOME)),)
    $(warning nvcc found at $(NVCC) but no libcudart_static.a beside it: building the CPU path only)
    NVCC :=
  endif
endif
ifneq ($(strip $(NVCC)),)
  CUDA_ARCH ?= -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
               -gencode arch=compute_90,code=compute_90
  GPU_CU := $(wildcard gpu/cuda/*.cu)
  GPU_DEFS := -DRADPIPE_HAVE_CUDA=1
  CUDA_LIBS := -L$(dir $(call cuda_rt,$(CUDA_HOME))) -lcudart_static -lrt
  NVCCFLAGS := -O3 -std=c++17 $(CUDA_ARCH) -Ilibcommon/include -Igpu $(GPU_DEFS) \
               -Xcompiler -Wall,-fno-omit-frame-pointer -MMD -MP
endif

CFLAGS := -std=gnu11 -D_GNU_SOURCE -pthread $(WARN) $(OPT) $(INCS) $(GPU_DEFS) -MMD -MP
CXXFLAGS := -std=c++17 -pthread $(WARN) $(OPT) $(INCS) $(GDCM_CFLAGS) $(GPU_DEFS) -MMD -MP
LDFLAGS := -pthread $(LDOPT)

obj = $(patsubst %.cc,$(BUILD)/obj/%.o,$(patsubst %.c,$(BUILD)/obj/%.o,$(1)))

# --- libcommon.a -------------------------------------------------------------------------
LC_SRC := $(wildcard libcommon/*.c libcommon/*.cc)
LC_OBJ := $(call obj,$(LC_SRC)) $(BUILD)/obj/gen/lc_migrations.o
LIBCOMMON := $(BUILD)/lib/libcommon.a

$(BUILD)/gen/lc_migrations.c: $(wildcard proto/sql/*.sql) libcommon/gen-migrations.sh
	@mkdir -p $(@D)
	sh libcommon/gen-migrations.sh proto/sql > $@

$(BUILD)/obj/gen/lc_migrations.o: $(BUILD)/gen/lc_migrations.c
	@mkdir -p $(@D)
	$(CC) $(CFLAGS) -c -o $@ $<

$(LIBCOMMON): $(LC_OBJ)
	@mkdir -p $(@D)
	rm -f $@ && ar rcs $@ $^

# --- gpu/nn: the inference engine. ONNX through protobuf-c's code generated from Debian
# libonnx-dev's onnx.proto into $(BUILD)/gen/onnx; oneDNN (Debian libdnnl-dev, no pkg-config
# file there: -ldnnl) and its OpenMP runtime (libgomp, whose thread count the engine sets) on
# the CPU; cuDNN is opened at run time by gpu/cuda/nn_cudnn.cu (dlopen), so nothing links it.
# The libraries are linked --as-needed: only binaries that call gpu_nn_* depend on them. ----
ONNX_PROTO ?= /usr/include/onnx/onnx.proto
NN_GEN_C := $(BUILD)/gen/onnx/onnx.pb-c.c
NN_GEN_H := $(BUILD)/gen/onnx/onnx.pb-c.h
NN_SRC := $(wildcard gpu/nn/*.c)
NN_OBJ := $(call obj,$(NN_SRC)) $(BUILD)/obj/gen/onnx/onnx.pb-c.o
NN_CFLAGS := $(shell pkg-config --cflags libprotobuf-c 2>/dev/null) \
             $(shell pkg-config --cflags dnnl 2>/dev/null)
NN_LIBS := -Wl,--push-state,--as-needed \
           $(or $(shell pkg-config --libs libprotobuf-c 2>/dev/null),-lprotobuf-c) \
           $(or $(shell pkg-config --libs dnnl 2>/dev/null),-ldnnl) -lgomp \
           -Wl,--pop-state

$(NN_GEN_C): $(ONNX_PROTO)
	@mkdir -p $(@D)
	protoc-c --proto_path=$(abspath $(dir $(ONNX_PROTO))..) --c_out=$(BUILD)/gen onnx/$(notdir $<)
$(NN_GEN_H): $(NN_GEN_C) ;

$(BUILD)/obj/gen/onnx/onnx.pb-c.o: $(NN_GEN_C)
	@mkdir -p $(@D)
	$(CC) $(CFLAGS) $(NN_CFLAGS) -c -o $@ $<

# nn_cpu.c's own kernels run on the OpenMP threads oneDNN runs on (libgomp, GCC's); clang's
# OpenMP is another runtime (libomp), so the clang fuzz build runs them without OpenMP
NN_OPENMP := $(if $(findstring clang,$(CC)),,-fopenmp)
$(NN_OBJ): CFLAGS += $(NN_CFLAGS)
$(BUILD)/obj/gpu/nn/nn_cpu.o: CFLAGS += $(NN_OPENMP)
$(NN_OBJ): | $(NN_GEN_H)
lint: $(NN_GEN_H)

# --- libgpu.a: gpu/ (runtime choice), gpu/ref (CPU), gpu/nn, gpu/cuda (when nvcc is found) -
GPU_SRC := $(wildcard gpu/*.c gpu/ref/*.c)
GPU_OBJ := $(call obj,$(GPU_SRC)) $(NN_OBJ) $(patsubst %.cu,$(BUILD)/obj/%.cu.o,$(GPU_CU))
LIBGPU := $(BUILD)/lib/libgpu.a

$(LIBGPU): $(GPU_OBJ)
	@mkdir -p $(@D)
	rm -f $@ && ar rcs $@ $^

$(BUILD)/obj/%.cu.o: %.cu gpu/gpu_seg.h
	@mkdir -p $(@D)
	$(NVCC) $(NVCCFLAGS) -c -o $@ $<

# --- generic compile rules ---------------------------------------------------------------
$(BUILD)/obj/%.o: %.c
	@mkdir -p $(@D)
	$(CC) $(CFLAGS) -c -o $@ $<

$(BUILD)/obj/%.o: %.cc
	@mkdir -p $(@D)
	$(CXX) $(CXXFLAGS) -c -o $@ $<

$(LC_OBJ) $(GPU_OBJ): | $(BUILD)/gen/lc_migrations.c

# --- services ----------------------------------------------------------------------------
SERVICES := api-gateway dicom-indexer storage-uploader gpu-segmenter radpipe-notify
LINK_LIBS := $(LIBGPU) $(LIBCOMMON) $(LIBS) $(NN_LIBS) $(CUDA_LIBS)

# the web UI's files, embedded in the api-gateway (services/api-gateway/gen-ui.sh)
GW_UI_FILES := $(sort $(wildcard services/api-gateway/ui/*.html services/api-gateway/ui/*.js \
	services/api-gateway/ui/*.css))
$(BUILD)/gen/gw_ui_assets.c: $(GW_UI_FILES) services/api-gateway/gen-ui.sh
	@mkdir -p $(@D)
	sh services/api-gateway/gen-ui.sh $(GW_UI_FILES) > $@
$(BUILD)/obj/gen/gw_ui_assets.o: $(BUILD)/gen/gw_ui_assets.c
	@mkdir -p $(@D)
	$(CC) $(CFLAGS) -Iservices/api-gateway -c -o $@ $<
SVC_GEN_api-gateway := $(BUILD)/obj/gen/gw_ui_assets.o

define service_rule
SVC_OBJ_$(1) := $$(call obj,$$(wildcard services/$(1)/*.c)) $$(SVC_GEN_$(1))
SVC_LIBOBJ_$(1) := $$(filter-out %/main.o,$$(SVC_OBJ_$(1)))
$(BUILD)/bin/$(1): $$(SVC_OBJ_$(1)) $(LIBGPU) $(LIBCOMMON)
	@mkdir -p $$(@D)
	$(CXX) $(LDFLAGS) -o $$@ $$(SVC_OBJ_$(1)) $(LINK_LIBS)
# the service's tests include its private headers
$(BUILD)/obj/tests/unit/services/$(1)/%.o: CFLAGS += -Iservices/$(1)
endef
$(foreach s,$(SERVICES),$(eval $(call service_rule,$(s))))
SERVICE_BINS := $(SERVICES:%=$(BUILD)/bin/%)

# --- TLS shims for the gateway (services/api-gateway/gw_tls.c explains): libssl.so and
# libcrypto.so under lib/radpipe/ beside bin/, built without sanitizers ------------------
TLS_SHIMS := $(BUILD)/lib/radpipe/libssl.so $(BUILD)/lib/radpipe/libcrypto.so
$(BUILD)/lib/radpipe/libssl.so: services/api-gateway/tls/tls_shim.c
	@mkdir -p $(@D)
	$(CC) -shared -fPIC -O2 -Wall -Wextra -Werror -DSHIM_SSL -o $@ $< -Wl,-soname,libssl.so \
		-Wl,--no-as-needed -lssl -lcrypto
$(BUILD)/lib/radpipe/libcrypto.so: services/api-gateway/tls/tls_shim.c
	@mkdir -p $(@D)
	$(CC) -shared -fPIC -O2 -Wall -Wextra -Werror -o $@ $< -Wl,-soname,libcrypto.so \
		-Wl,--no-as-needed -lcrypto

# --- dev tools: the stack runner, the Kafka-protocol dev broker, radpipe-notify ----------
TOOLS := radpipe-stack radpipe-devbroker
define tool_rule
$(BUILD)/bin/$(1): $$(call obj,deploy/dev/$(1).c) $(LIBGPU) $(LIBCOMMON)
	@mkdir -p $$(@D)
	$(CXX) $(LDFLAGS) -o $$@ $$< $(LINK_LIBS)
endef
$(foreach t,$(TOOLS),$(eval $(call tool_rule,$(t))))
TOOL_BINS := $(TOOLS:%=$(BUILD)/bin/%)

# --- tests: tests/unit/<dir>/test_*.c, tests/integration/test_*.c ------------------------
# A test under tests/unit/services/<svc>/ also links that service's objects but main.o.
TEST_SRC := $(shell find tests/unit tests/integration -name 'test_*.c' 2>/dev/null | sort)
SUPPORT_OBJ := $(call obj,$(wildcard tests/support/*.c))
$(BUILD)/obj/tests/%.o: CFLAGS += -Itests/support
TEST_BINS := $(patsubst tests/%.c,$(BUILD)/tests/%,$(TEST_SRC))

# Generic tests link libgpu/libcommon; a service's tests also link its objects (rule in
# service_tests, so a broken service blocks only its own tests).
$(BUILD)/tests/%: $(BUILD)/obj/tests/%.o $(SUPPORT_OBJ) $(LIBGPU) $(LIBCOMMON)
	@mkdir -p $(@D)
	$(CXX) $(LDFLAGS) -o $@ $< $(SUPPORT_OBJ) $(LINK_LIBS) -lcmocka

define service_tests
$(BUILD)/tests/unit/services/$(1)/%: $(BUILD)/obj/tests/unit/services/$(1)/%.o $(SUPPORT_OBJ) \
		$$(SVC_LIBOBJ_$(1)) $(LIBGPU) $(LIBCOMMON)
	@mkdir -p $$(@D)
	$(CXX) $(LDFLAGS) -o $$@ $$< $(SUPPORT_OBJ) $$(SVC_LIBOBJ_$(1)) $(LINK_LIBS) -lcmocka
endef
$(foreach s,$(SERVICES),$(eval $(call service_tests,$(s))))

# --- benchmarks: tests/bench/bench_*.c, run by tests/bench/run.sh -------------------------
BENCH_BINS := $(patsubst tests/bench/%.c,$(BUILD)/bench/%,$(wildcard tests/bench/bench_*.c))
$(BUILD)/bench/%: $(BUILD)/obj/tests/bench/%.o $(LIBGPU) $(LIBCOMMON)
	@mkdir -p $(@D)
	$(CXX) $(LDFLAGS) -o $@ $< $(LINK_LIBS)
# bench_body times the segmenter's own pipeline: it links the service's objects
$(BUILD)/obj/tests/bench/bench_body.o: CFLAGS += -Iservices/gpu-segmenter
$(BUILD)/bench/bench_body: $(BUILD)/obj/tests/bench/bench_body.o $(SVC_LIBOBJ_gpu-segmenter) \
		$(LIBGPU) $(LIBCOMMON)
	@mkdir -p $(@D)
	$(CXX) $(LDFLAGS) -o $@ $< $(SVC_LIBOBJ_gpu-segmenter) $(LINK_LIBS)
# bench_upload times the uploader's own job function: it links the service's objects
$(BUILD)/obj/tests/bench/bench_upload.o: CFLAGS += -Iservices/storage-uploader
$(BUILD)/bench/bench_upload: $(BUILD)/obj/tests/bench/bench_upload.o \
		$(SVC_LIBOBJ_storage-uploader) $(LIBGPU) $(LIBCOMMON)
	@mkdir -p $(@D)
	$(CXX) $(LDFLAGS) -o $@ $< $(SVC_LIBOBJ_storage-uploader) $(LINK_LIBS)
# helpers of the stack benchmarks (bench_ingest.sh, bench_dicomweb.sh): the generic rule above
BENCH_BINS += $(BUILD)/bench/gen_ct $(BUILD)/bench/ingest_feed $(BUILD)/bench/post_load

# --- gpu-segmenter model jobs and the test models (services/gpu-segmenter/README.md) -------
# seg_nn_config.h says whether libgpu holds the inference engine (gpu/gpu_nn.h, objects under
# gpu/nn/); it is rewritten only when that changes, so the segmenter, its tests and bench_nn
# are rebuilt exactly then. Without the engine, model jobs fail with "not built".
SEG_NN = $(if $(filter $(BUILD)/obj/gpu/nn/%,$(GPU_OBJ)),1,0)
SEG_NN_H := $(BUILD)/gen/seg_nn_config.h
$(SEG_NN_H): seg-nn-force
	@mkdir -p $(@D)
	@v='#define SEG_HAVE_NN $(SEG_NN)'; [ "$$(cat $@ 2>/dev/null)" = "$$v" ] || echo "$$v" >$@
$(SVC_OBJ_gpu-segmenter) $(BUILD)/obj/tests/bench/bench_nn.o \
		$(patsubst %.c,$(BUILD)/obj/%.o,$(wildcard tests/unit/services/gpu-segmenter/*.c)): \
		$(SEG_NN_H)
# bench_nn: the engine's CPU forward pass against PyTorch (tests/bench/bench_nn.sh)
$(BUILD)/obj/tests/bench/bench_nn.o: CFLAGS += -Iservices/gpu-segmenter
# tests/data/models: made by tests/models/gen_models.py (PyTorch, ONNX), committed; not run by
# `make test`
models:
	@sh deploy/install-deps.sh models
	/usr/bin/python3 tests/models/gen_models.py
.PHONY: models seg-nn-force

# --- fuzz targets (clang, libFuzzer): tests/fuzz/fuzz_<name>.c, seeds in tests/fuzz/<name>/ -
FUZZ_SRC := $(wildcard tests/fuzz/fuzz_*.c)
FUZZ_BINS := $(patsubst tests/fuzz/%.c,build/fuzz/fuzz/%,$(FUZZ_SRC))
FUZZ_SECONDS ?= 30

build/fuzz/fuzz/%: tests/fuzz/%.c build/fuzz/lib/libcommon.a
	@mkdir -p $(@D)
	$(CC) $(CFLAGS) -c -o $@.o $<
	$(CXX) $(LDFLAGS) -fsanitize=fuzzer -o $@ $@.o build/fuzz/lib/libcommon.a $(LIBS)

# the ONNX loader's target runs gpu_nn_load on a CPU context: it links libgpu.a (no CUDA in
# MODE=fuzz) and the engine's libraries
build/fuzz/fuzz/fuzz_onnx: tests/fuzz/fuzz_onnx.c build/fuzz/lib/libgpu.a build/fuzz/lib/libcommon.a
	@mkdir -p $(@D)
	$(CC) $(CFLAGS) -c -o $@.o $<
	$(CXX) $(LDFLAGS) -fsanitize=fuzzer -o $@ $@.o build/fuzz/lib/libgpu.a \
		build/fuzz/lib/libcommon.a $(LIBS) $(NN_LIBS)

.PHONY: all deps deps-bench tests test run bench fuzz fuzz-bins lint format clean
all: $(LIBCOMMON) $(LIBGPU) $(SERVICE_BINS) $(TOOL_BINS) $(TLS_SHIMS)
tests: all $(TEST_BINS)

deps:
	@sh deploy/install-deps.sh

deps-bench:
	@sh deploy/install-deps.sh bench

test: deps
	+$(MAKE) MODE=test tests
	+$(MAKE) MODE=fuzz fuzz-bins
	sh tests/run.sh build/test

run: deps
	+$(MAKE) MODE=release all
	exec build/release/bin/radpipe-stack

bench: deps-bench
	+$(MAKE) MODE=release all $(patsubst $(BUILD)/%,build/release/%,$(BENCH_BINS))
	sh tests/bench/run.sh build/release

fuzz: deps
	+$(MAKE) MODE=fuzz fuzz-bins
	sh tests/fuzz/run.sh build/fuzz/fuzz $(FUZZ_SECONDS)

fuzz-bins: $(FUZZ_BINS)

C_FILES = $(shell git ls-files '*.c' '*.h' '*.cc' '*.cu')
TIDY_INCS := $(INCS) $(foreach s,$(SERVICES),-Iservices/$(s)) -Itests/support
lint: $(BUILD)/gen/lc_migrations.c
	clang-format --dry-run --Werror $(C_FILES)
	cppcheck --quiet --error-exitcode=1 --enable=warning,portability --inline-suppr \
		--suppress=missingIncludeSystem -D__CPPCHECK__ -Ilibcommon/include -Igpu \
		libcommon services gpu deploy/dev
	clang-tidy --quiet $(filter-out tests/%,$(filter %.c,$(C_FILES))) -- -std=gnu11 \
		-D_GNU_SOURCE $(TIDY_INCS)

format:
	clang-format -i $(C_FILES)

clean:
	rm -rf build

-include $(shell find $(BUILD) -name '*.d' 2>/dev/null)
