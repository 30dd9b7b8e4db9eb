// Fuzz target: the image readers (PPM P3/P6, BMP, PNG with inflate), then crop + resize.
#include "../../instastyle.h"
#include <stdlib.h>
int LLVMFuzzerTestOneInput(const unsigned char* data, size_t size) {
    Image img;
    if (image_read_mem(&img, data, size) == 0) {
        if (!img.rgb || img.w < 1 || img.h < 1) abort();
        Image r = image_center_crop_resize(&img, 7, 5);
        image_free(&r);
        image_free(&img);
    } else if (img.rgb) {
        abort();
    }
    return 0;
}
