/* cmoe command line: the only place that prints errors and picks exit codes. */
#include <stdio.h>
#include <string.h>

int main(int argc, char **argv) {
    if (argc < 2 || strcmp(argv[1], "--help") == 0) {
        printf("usage: cmoe COMMAND\n");
        return argc < 2 ? 2 : 0;
    }
    return 0;
}
