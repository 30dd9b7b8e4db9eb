# instastyle: plain C, libc + libm + pthreads. No detection: the switches below are explicit.
#   make                 optimised build of ./instastyle
#   make test            builds and runs every test (golden cases, unit tests, CLI checks)
#   make debug           the same tests under AddressSanitizer + UndefinedBehaviorSanitizer
#   make golden          only the golden cases of GOLDEN (default ../shared/golden)
#   make bench           ./instastyle bench (full-size SD 1.5 with random weights)
#   make demo            invert → candidates → generate → mix on the tiny fixture model
#   make fuzz            libFuzzer targets (clang), FUZZ_SECONDS each
#   OPENMP=1             use OpenMP for the thread pool instead of pthreads
#   CUDA=1               also compile nn_cuda.cu with nvcc (CUDA_ARCH, default sm_90)
CC ?= cc
CFLAGS ?= -O2 -std=c11 -Wall -Wextra
LDLIBS = -lm -lpthread
GOLDEN ?= ../shared/golden
DEVICE ?= cpu
FUZZ_SECONDS ?= 600

SRC = tensor.c gemm.c nn.c sd.c ddim.c lora.c tokenizer.c image.c
ifeq ($(OPENMP),1)
  CFLAGS += -fopenmp
  LDLIBS += -fopenmp
endif
ifeq ($(DEVICE),cuda)
  CUDA = 1
endif
ifeq ($(CUDA),1)
  BUILD ?= build-cuda
  NVCC ?= nvcc
  CUDA_ARCH ?= sm_90
  CFLAGS += -DUSE_CUDA
  # Where the CUDA runtime library lives differs between NVIDIA's toolkit (next to nvcc) and
  # distribution packages (/usr/lib/<triplet>); CUDA_LIBDIR overrides the search.
  NVCC_DIR := $(dir $(shell command -v $(NVCC) 2>/dev/null))
  CUDA_LIB_CANDIDATES = $(NVCC_DIR)../lib64 $(NVCC_DIR)../targets/x86_64-linux/lib \
      $(NVCC_DIR)../targets/sbsa-linux/lib /usr/local/cuda/lib64 /usr/lib/x86_64-linux-gnu /usr/lib/aarch64-linux-gnu
  CUDART_STATIC := $(firstword $(wildcard $(CUDA_LIB_CANDIDATES:%=%/libcudart_static.a)))
  CUDART_SHARED := $(firstword $(wildcard $(CUDA_LIB_CANDIDATES:%=%/libcudart.so)))
  ifneq ($(CUDART_STATIC),)
    CUDA_LIBDIR ?= $(dir $(CUDART_STATIC))
    CUDART = -lcudart_static -ldl -lrt
  else ifneq ($(CUDART_SHARED),)
    CUDA_LIBDIR ?= $(dir $(CUDART_SHARED))
    CUDART = -lcudart
  else
    CUDART = -lcudart_static -ldl -lrt
  endif
  LDLIBS += $(if $(CUDA_LIBDIR),-L$(CUDA_LIBDIR)) $(CUDART) -lstdc++
  CUDA_OBJ = $(BUILD)/nn_cuda.o
endif
BUILD ?= build
OBJ = $(SRC:%.c=$(BUILD)/%.o) $(CUDA_OBJ)
TESTS = $(BUILD)/run_golden $(BUILD)/test_tokenizer $(BUILD)/test_image $(BUILD)/test_gemm $(BUILD)/test_kernels $(BUILD)/gradcheck $(BUILD)/test_units $(BUILD)/test_lora $(BUILD)/test_train_loss

ifeq ($(CUDA),1)
  TESTS += $(BUILD)/test_cuda
endif

.PHONY: all test debug golden bench demo fuzz clean cuda-check cuda-build cuda-compile cuda-found cuda-libdir cuda-link-flags cuda-link-flags-print
all: instastyle

$(BUILD)/%.o: %.c instastyle.h | $(BUILD)
	$(CC) $(CFLAGS) -c $< -o $@
$(BUILD)/tokenizer.o: unicode_tables.h
$(BUILD)/nn_cuda.o: nn_cuda.cu instastyle.h | $(BUILD)
	$(NVCC) -O3 -std=c++17 -arch=$(CUDA_ARCH) -Xcompiler -Wall,-Wextra -c $< -o $@
$(BUILD):
	mkdir -p $(BUILD)

instastyle: $(BUILD)/instastyle.o $(OBJ)
	$(CC) $(CFLAGS) $^ -o $@ $(LDLIBS)

$(BUILD)/run_golden: tests/run_golden.c tests/golden_kinds.c tests/golden_clip.c tests/golden.h $(OBJ)
	$(CC) $(CFLAGS) -I. tests/run_golden.c tests/golden_kinds.c tests/golden_clip.c $(OBJ) -o $@ $(LDLIBS)
# Fuzz targets replayed over their seeds and regression inputs without libFuzzer (make fuzz runs them for real).
FUZZ_TARGETS = safetensors json image png_inflate tokenizer vocab manifest noise trained
REPLAYS = $(FUZZ_TARGETS:%=$(BUILD)/replay_%)
$(BUILD)/replay_%: tests/fuzz/fuzz_%.c tests/fuzz/replay.c $(OBJ)
	$(CC) $(CFLAGS) -I. $< tests/fuzz/replay.c $(OBJ) -o $@ $(LDLIBS)
$(BUILD)/%: tests/%.c $(OBJ)
	$(CC) $(CFLAGS) -I. $< $(OBJ) -o $@ $(LDLIBS)

test: instastyle $(TESTS) $(REPLAYS)
	tests/run_tests.sh $(BUILD) $(GOLDEN)

debug:
	$(MAKE) BUILD=build-debug CFLAGS="-O1 -g -std=c11 -Wall -Wextra -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all" \
	    SANITIZE=1 instastyle-debug test-debug
instastyle-debug: $(BUILD)/instastyle.o $(OBJ)
	$(CC) $(CFLAGS) $^ -o $(BUILD)/instastyle $(LDLIBS)
test-debug: instastyle-debug $(TESTS) $(REPLAYS)
	ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1 \
	    INSTASTYLE=$(BUILD)/instastyle tests/run_tests.sh $(BUILD) $(GOLDEN)

golden: $(BUILD)/run_golden
	INSTASTYLE_DEVICE=$(DEVICE) $(BUILD)/run_golden $(GOLDEN)

# The CUDA build into build-cuda/ (never replaces the CPU ./instastyle): compiled by CI when nvcc
# exists; run on a machine with an NVIDIA GPU (see the README).
cuda-check:
	$(MAKE) CUDA=1 BUILD=build-cuda cuda-build
# Only compile nn_cuda.cu (no CUDA runtime library needed); cuda-found says whether one was found.
cuda-compile:
	$(MAKE) CUDA=1 BUILD=build-cuda build-cuda/nn_cuda.o
cuda-found:
	@$(MAKE) -s CUDA=1 BUILD=build-cuda cuda-libdir
cuda-libdir:
	@echo "$(CUDA_LIBDIR)"
cuda-link-flags:     # what the CUDA build links with (CI probes it on a small program first)
	@$(MAKE) -s CUDA=1 BUILD=build-cuda cuda-link-flags-print
cuda-link-flags-print:
	@echo "$(LDLIBS)"
cuda-build: $(BUILD)/instastyle $(TESTS)
$(BUILD)/instastyle: $(BUILD)/instastyle.o $(OBJ)
	$(CC) $(CFLAGS) $^ -o $@ $(LDLIBS)

bench: instastyle
	./instastyle bench

demo: instastyle
	tests/demo.sh $(GOLDEN)

fuzz:
	tests/fuzz/run_fuzz.sh $(FUZZ_SECONDS)

clean:
	rm -rf build build-debug build-fuzz build-cuda instastyle
