set terminal pngcairo size 900,560 font ',10' noenhanced
set output 'curves.png'
set title 'cmoe study upcycling, valid bpc, mean +- sd over seeds'
set xlabel 'step'
set ylabel 'valid bpc'
set grid
set key outside right top
set style fill transparent solid 0.2 noborder
plot 'curves.tsv' index 0 using 1:3:4 with filledcurves lc rgb '#4477aa' notitle, 'curves.tsv' index 0 using 1:2 with lines lw 2 lc rgb '#4477aa' title 'dense-source', \
     'curves.tsv' index 1 using 1:3:4 with filledcurves lc rgb '#cc3311' notitle, 'curves.tsv' index 1 using 1:2 with lines lw 2 lc rgb '#cc3311' title 'dense', \
     'curves.tsv' index 2 using 1:3:4 with filledcurves lc rgb '#228833' notitle, 'curves.tsv' index 2 using 1:2 with lines lw 2 lc rgb '#228833' title 'e8g1t2', \
     'curves.tsv' index 3 using 1:3:4 with filledcurves lc rgb '#ccbb44' notitle, 'curves.tsv' index 3 using 1:2 with lines lw 2 lc rgb '#ccbb44' title 'e16g4t4-softmax-topk', \
     'curves.tsv' index 4 using 1:3:4 with filledcurves lc rgb '#66ccee' notitle, 'curves.tsv' index 4 using 1:2 with lines lw 2 lc rgb '#66ccee' title 'e16g4t4-topk-softmax', \
     'curves.tsv' index 5 using 1:3:4 with filledcurves lc rgb '#aa3377' notitle, 'curves.tsv' index 5 using 1:2 with lines lw 2 lc rgb '#aa3377' title 'no-scaling', \
     'curves.tsv' index 6 using 1:3:4 with filledcurves lc rgb '#555555' notitle, 'curves.tsv' index 6 using 1:2 with lines lw 2 lc rgb '#555555' title 'no-groups', \
     'curves.tsv' index 7 using 1:3:4 with filledcurves lc rgb '#ee7733' notitle, 'curves.tsv' index 7 using 1:2 with lines lw 2 lc rgb '#ee7733' title 'drop-0.5', \
     'curves.tsv' index 8 using 1:3:4 with filledcurves lc rgb '#0077bb' notitle, 'curves.tsv' index 8 using 1:2 with lines lw 2 lc rgb '#0077bb' title 'scratch'
