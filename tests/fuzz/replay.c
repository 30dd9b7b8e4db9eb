// replay.c: a main() for the fuzz targets without libFuzzer, so that every seed and every
// regression input (tests/fuzz/regressions/<target>/) runs in `make test` and `make debug`.
// usage: replay_<target> FILE_OR_DIR...   (prints "N passed, 0 failed": a crash fails the run)
#define _DEFAULT_SOURCE
#include "../../instastyle.h"
#include <dirent.h>
#include <stdlib.h>
#include <string.h>
int LLVMFuzzerTestOneInput(const unsigned char* data, size_t size);
static int run_file(const char* path) {
    size_t len;
    char* buf = file_read_all(path, &len, (size_t)64 << 20);
    if (!buf) { fprintf(stderr, "replay: %s\n", error_last()); return 0; }
    LLVMFuzzerTestOneInput((const unsigned char*)buf, len);
    free(buf);
    return 1;
}
int main(int argc, char** argv) {
    int n = 0;
    for (int i = 1; i < argc; i++) {
        if (!path_is_dir(argv[i])) { n += run_file(argv[i]); continue; }
        DIR* d = opendir(argv[i]);
        struct dirent* e;
        while (d && (e = readdir(d))) {
            if (e->d_name[0] == '.') continue;
            char p[4096];
            snprintf(p, sizeof p, "%s/%s", argv[i], e->d_name);
            n += run_file(p);
        }
        if (d) closedir(d);
    }
    printf("%d passed, 0 failed\n", n);
    return 0;
}
