set terminal pngcairo size 900,560 font ',10' noenhanced
set output 'curves.png'
set title 'cmoe study merge, valid bpc, mean +- sd over seeds'
set xlabel 'step'
set ylabel 'valid bpc'
set grid
set key outside right top
set style fill transparent solid 0.2 noborder
plot 'curves.tsv' index 0 using 1:3:4 with filledcurves lc rgb '#4477aa' notitle, 'curves.tsv' index 0 using 1:2 with lines lw 2 lc rgb '#4477aa' title 'base', \
     'curves.tsv' index 1 using 1:3:4 with filledcurves lc rgb '#555555' notitle, 'curves.tsv' index 1 using 1:2 with lines lw 2 lc rgb '#555555' title 'naive-ft', \
     'curves.tsv' index 2 using 1:3:4 with filledcurves lc rgb '#ee7733' notitle, 'curves.tsv' index 2 using 1:2 with lines lw 2 lc rgb '#ee7733' title 'msmoe-uniform-ft', \
     'curves.tsv' index 3 using 1:3:4 with filledcurves lc rgb '#0077bb' notitle, 'curves.tsv' index 3 using 1:2 with lines lw 2 lc rgb '#0077bb' title 'msmoe-unaligned-ft', \
     'curves.tsv' index 4 using 1:3:4 with filledcurves lc rgb '#009988' notitle, 'curves.tsv' index 4 using 1:2 with lines lw 2 lc rgb '#009988' title 'msmoe-ft', \
     'curves.tsv' index 5 using 1:3:4 with filledcurves lc rgb '#ee3377' notitle, 'curves.tsv' index 5 using 1:2 with lines lw 2 lc rgb '#ee3377' title 'prune-ft', \
     'curves.tsv' index 6 using 1:3:4 with filledcurves lc rgb '#999933' notitle, 'curves.tsv' index 6 using 1:2 with lines lw 2 lc rgb '#999933' title 'scratch4'
