#include "train/progress.h"

#include <stdarg.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

void progress_init(cm_progress *progress, FILE *stream, int64_t first_step, int64_t total_steps,
                   bool enabled) {
    progress->stream = stream;
    progress->tty = isatty(fileno(stream)) == 1;
    progress->enabled = enabled;
    progress->first_step = first_step;
    progress->total_steps = total_steps;
    progress->start_time = cm_now();
    progress->line_drawn = false;
}

void format_duration(double seconds, char *out, size_t size) {
    long total = seconds > 0 ? (long)(seconds + 0.5) : 0;
    if (total >= 3600)
        snprintf(out, size, "%ld:%02ld:%02ld", total / 3600, total / 60 % 60, total % 60);
    else
        snprintf(out, size, "%ld:%02ld", total / 60, total % 60);
}

/* A bar of `width` cells using eighth-blocks for the partial cell. */
static void draw_bar(char *out, size_t size, double fraction, int width) {
    static const char *const eighths[] = {"", "▏", "▎", "▍", "▌", "▋", "▊", "▉"};
    if (fraction < 0) fraction = 0;
    if (fraction > 1) fraction = 1;
    int total_eighths = (int)(fraction * width * 8);
    size_t used = (size_t)snprintf(out, size, "▕");
    int cells = 0;
    for (; cells < total_eighths / 8 && used < size; cells++)
        used += (size_t)snprintf(out + used, size - used, "█");
    if (cells < width && used < size) {
        used += (size_t)snprintf(out + used, size - used, "%s", eighths[total_eighths % 8]);
        if (total_eighths % 8) cells++;
    }
    for (; cells < width && used < size; cells++)
        used += (size_t)snprintf(out + used, size - used, " ");
    if (used < size) snprintf(out + used, size - used, "▏");
}

static void format_rate(double rate, const char *unit, char *out, size_t size) {
    if (rate >= 1e6)
        snprintf(out, size, "%.2fM %s", rate / 1e6, unit);
    else if (rate >= 1e4)
        snprintf(out, size, "%.1fk %s", rate / 1e3, unit);
    else
        snprintf(out, size, "%.0f %s", rate, unit);
}

void progress_update(cm_progress *progress, int64_t step, const char *metrics, double rate,
                     const char *unit, bool log_line) {
    if (!progress->enabled || (!progress->tty && !log_line)) return;
    int64_t done = step - progress->first_step;
    int64_t todo = progress->total_steps - progress->first_step;
    double elapsed = cm_now() - progress->start_time;
    double remaining = done > 0 ? elapsed / (double)done * (double)(todo - done) : 0.0;
    char eta[32], rate_text[48], bar[160];
    format_duration(remaining, eta, sizeof eta);
    format_rate(rate, unit, rate_text, sizeof rate_text);
    int digits = snprintf(NULL, 0, "%lld", (long long)progress->total_steps);
    if (progress->tty) {
        draw_bar(bar, sizeof bar, todo > 0 ? (double)done / (double)todo : 1.0, 20);
        fprintf(progress->stream, "\r\033[Kstep %*lld/%lld %s %s  %s  ETA %s", digits,
                (long long)step, (long long)progress->total_steps, bar, metrics, rate_text, eta);
        progress->line_drawn = true;
    } else {
        fprintf(progress->stream, "step %*lld/%lld  %s  %s  ETA %s\n", digits, (long long)step,
                (long long)progress->total_steps, metrics, rate_text, eta);
    }
    fflush(progress->stream);
}

void progress_print(cm_progress *progress, const char *fmt, ...) {
    if (!progress->enabled) return;
    if (progress->line_drawn) fprintf(progress->stream, "\r\033[K");
    va_list args;
    va_start(args, fmt);
    vfprintf(progress->stream, fmt, args);
    va_end(args);
    fputc('\n', progress->stream);
    fflush(progress->stream);
    progress->line_drawn = false;
}

void progress_finish(cm_progress *progress) {
    if (progress->enabled && progress->line_drawn) fputc('\n', progress->stream);
    progress->line_drawn = false;
    fflush(progress->stream);
}
